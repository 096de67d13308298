"""Feedback reading and validation: (image, prompt, like/dislike) rows from any source, checked before training.

`read_feedback` reads a .jsonl / .csv / .tsv / .parquet file, an image folder, a save_to_disk folder or a hub
dataset id through the one reader stack (records.py), the official Diffusion-KTO CSV through official.py, and
turns every record into a `FeedbackRow` (rows.py). A problem confined to one row is a `BadRow` (bad_rows.py): the
validation pass collects all of them, then stops with one error naming them or, with ``data.on_bad_row=skip``,
leaves them out and reports them.
"""
from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from .bad_rows import BadRow, count_reasons, error_message, in_file_order, listing, skip_summary, split_where
from .official import is_official_csv, read_official_csv
from .records import Columns, column_names, feedback_entries, find_metadata, locate, source_records
from .rows import FEEDBACK_OPTIONS, Entry, FeedbackError, FeedbackRow, first_line

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeedbackSummary:
    """Counts of a validated feedback set: the rows kept, and the bad rows skipped per reason."""

    n: int
    n_desirable: int
    n_undesirable: int
    n_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    pairs: int | None = None  # a source of preference pairs (pairs.py): the pairs kept; n counts both their images
    dropped: dict[str, int] = field(default_factory=dict)  # rows left out by design, not bad: e.g. Pick-a-Pic ties

    def describe(self) -> str:
        """"117 rows (95 liked, 22 disliked)" or "40 pairs (80 images)", then "; skipped 3 of 120 rows: 2 missing
        image, ..." if any were, and what was dropped."""
        if self.pairs is None:
            text = f"{self.n} rows ({self.n_desirable} liked, {self.n_undesirable} disliked)"
        else:
            text = f"{self.pairs} pairs ({self.n} images)"
        total = (self.n if self.pairs is None else self.pairs) + self.n_skipped + sum(self.dropped.values())
        text += f"; {skip_summary(self.skipped, total)}" if self.n_skipped else ""
        return text + "".join(f"; dropped {n} ({why})" for why, n in self.dropped.items())


# ---------------------------------------------------------------------------------------------- reading


def read_feedback(
    path: str | Path,
    *,
    image_column: str = "image",
    prompt_column: str = "prompt",
    label_column: str = "label",
    split: str = "train",
    policy: str = "win_intermediate",
    bad_rows: list[BadRow] | None = None,
) -> list[FeedbackRow]:
    """Read feedback rows from a .jsonl / .csv / .tsv / .parquet file, a folder (records.folder_records) or a hub id.

    A CSV in the official Diffusion-KTO layout (file_name, caption, split) is labelled by `policy` (official.py).
    Rows with a problem of their own (unknown label, empty prompt, ...) raise one FeedbackError naming them all;
    when `bad_rows` is a list they are appended to it instead and left out (the validation pass decides).
    """
    columns = (image_column, prompt_column, label_column)
    local = locate(path)  # a Path, or a hub dataset id
    if _is_official(local, label_column):
        rows: list[Entry] = list(read_official_csv(local, policy))
    else:
        columns = _image_folder_columns(local, str(path), columns)
        wanted = Columns(columns, options=FEEDBACK_OPTIONS)
        rows = list(feedback_entries(source_records(path, wanted, split=split), columns))
    if not rows:
        raise FeedbackError(f"{path}: no feedback rows (the dataset is empty)")
    return _keep_good(rows, bad_rows)


def _is_official(local: Path | str, label_column: str) -> bool:
    """Whether a located source is a CSV file in the official Diffusion-KTO layout (official.py)."""
    is_csv = isinstance(local, Path) and local.is_file() and local.suffix.lower() == ".csv"
    return is_csv and is_official_csv(local, label_column)


def _image_folder_columns(local: Path | str, name: str, columns: tuple[str, str, str]) -> tuple[str, str, str]:
    """`columns`, with the image column read from `file_name` in an image folder whose metadata has no `image`
    column but a `file_name` one (the HF imagefolder convention)."""
    metadata = find_metadata(local) if isinstance(local, Path) and local.is_dir() else None
    if metadata is None or columns[0] != "image":
        return columns
    present = column_names(metadata, str(Path(name) / metadata.name))
    return ("file_name", *columns[1:]) if "image" not in present and "file_name" in present else columns


def _keep_good(entries: list[Entry], bad_rows: list[BadRow] | None) -> list[FeedbackRow]:
    """The good rows; the bad ones go to `bad_rows`, or, when it is None, raise one error naming them all."""
    bad = [entry for entry in entries if isinstance(entry, BadRow)]
    if bad and bad_rows is None:
        raise FeedbackError(error_message(bad, len(entries)))
    if bad_rows is not None:
        bad_rows.extend(bad)
    return [entry for entry in entries if isinstance(entry, FeedbackRow)]


# ---------------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Screened:
    """The outcome of the validation pass: the rows to train on, their counts, and the bad rows left out."""

    rows: list[FeedbackRow]
    summary: FeedbackSummary
    skipped: list[BadRow]
    pairs: list | None = None  # a source of preference pairs: its PreferencePairs (rows: their images, chosen first)


def image_problem(row: FeedbackRow) -> BadRow | None:
    """Why a row's image cannot be used (missing, unreadable, not an image), or None when it decodes."""
    label = f"image '{row.image}'" if isinstance(row.image, Path) else f"image ({len(row.image)} bytes)"
    try:
        if isinstance(row.image, Path) and not row.image.is_file():
            if not row.image.exists():
                return BadRow(row.where, "missing image", f"{label} not found")
            return BadRow(row.where, "unreadable image", f"{label} is not a file")
        source = row.image if isinstance(row.image, Path) else io.BytesIO(row.image)
        with Image.open(source) as image:
            image.verify()
    except Exception as err:  # PIL raises OSError, SyntaxError, struct.error, DecompressionBombError...
        detail = f"{label} cannot be read as an image ({type(err).__name__}: {first_line(err)})"
        return BadRow(row.where, "unreadable image", detail)
    return None


def _check_classes(rows: Sequence[FeedbackRow], n_skipped: int, objective: str, one_class_setting: str = "") -> None:
    """Raise unless both liked and disliked rows are left (``objective`` needs both at its settings); the message
    names what trains on one class: loss.name=sft, and ``one_class_setting`` where the objective has one."""
    n_desirable = sum(1 for row in rows if row.desirable)
    source = split_where(rows[0].where)[0]
    after = f" after skipping {n_skipped} bad row{'s' if n_skipped > 1 else ''}" if n_skipped else ""
    checks = ((n_desirable, "liked", "disliked"), (len(rows) - n_desirable, "disliked", "liked"))
    for count, missing, present in checks:
        if count == 0:
            raise FeedbackError(
                f"{source}: no {missing} rows (all {len(rows)} rows are {present}{after}); the `{objective}` objective "
                f"needs both liked and disliked rows at these settings (one class alone trains with loss.name=sft"
                f"{', or with ' + one_class_setting if one_class_setting else ''})"
            )


def _warn_duplicates(rows: Sequence[FeedbackRow]) -> None:
    """Log a warning for rows with the same image and prompt (not an error: repeated feedback is legal)."""
    seen: dict[tuple, FeedbackRow] = {}
    duplicates, conflicts, example = 0, 0, None
    for row in rows:
        image_key = str(row.image) if isinstance(row.image, Path) else hashlib.sha1(row.image).digest()
        key = (image_key, row.prompt)
        first = seen.setdefault(key, row)
        if first is not row:
            duplicates += 1
            conflicts += first.desirable != row.desirable
            example = example or (first.where, row.where)
    if duplicates:
        logger.warning(
            "%d duplicate feedback row(s) (same image and prompt), %d of them with the opposite label; e.g. %s and %s",
            duplicates, conflicts, *example,
        )


def screen_feedback(
    rows: Sequence[FeedbackRow],
    bad_rows: Sequence[BadRow] = (),
    *,
    skip: bool = False,
    need_both_classes: bool,
    check_images: bool = True,
    objective: str = "kto",
    one_class_setting: str = "",
) -> Screened:
    """The validation pass: every bad row (read_feedback's `bad_rows` and broken images) raises one error naming
    them all or, with `skip`, is left out and logged with counts per reason; then the class check for ``objective``."""
    total = len(rows) + len(bad_rows)
    if not total:
        raise FeedbackError("no feedback rows (the dataset is empty)")
    broken = {id(row): problem for row in rows if check_images and (problem := image_problem(row)) is not None}
    bad = in_file_order([*bad_rows, *broken.values()])
    kept = [row for row in rows if id(row) not in broken]
    if bad and (not skip or not kept):
        raise FeedbackError(error_message(bad, total))
    if bad:
        logger.warning("data.on_bad_row=skip: %s; first:\n%s", skip_summary(count_reasons(bad), total), listing(bad))
    if need_both_classes:
        _check_classes(kept, len(bad), objective, one_class_setting)
    _warn_duplicates(kept)
    n_desirable = sum(1 for row in kept if row.desirable)
    summary = FeedbackSummary(len(kept), n_desirable, len(kept) - n_desirable, len(bad), count_reasons(bad))
    return Screened(kept, summary, bad)


def validate(rows: Sequence[FeedbackRow], *, need_both_classes: bool, check_images: bool = True) -> FeedbackSummary:
    """Check that every image decodes and (for `kto`) that both liked and disliked rows exist; count them."""
    return screen_feedback(rows, need_both_classes=need_both_classes, check_images=check_images).summary


# ---------------------------------------------------------------------------------------------- images


def load_image(row: FeedbackRow) -> Image.Image:
    """Decode a row's image as RGB (EXIF rotation applied, transparency composited onto white)."""
    try:
        source = row.image if isinstance(row.image, Path) else io.BytesIO(row.image)
        with Image.open(source) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except Exception as err:
        problem = image_problem(row) or f"{row.where}: image cannot be decoded ({type(err).__name__}: {first_line(err)})"
        raise FeedbackError(str(problem)) from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of an image; transparent pixels become white instead of whatever colour they hide."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
