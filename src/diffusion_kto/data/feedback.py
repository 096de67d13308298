"""Feedback readers: (image, prompt, like/dislike) rows from JSONL, CSV, parquet, image folders or HF datasets.

Diffusion-KTO (arXiv 2404.04465) §4 trains on per-image binary feedback: each row says whether one image is
desirable for its prompt. Every reader here turns its source into the same `FeedbackRow`s, and every problem is
a `FeedbackError` that names the file, the row (1-based line for JSONL / CSV, 0-based index for parquet and
datasets) and the key or column at fault. A problem confined to one row is a `BadRow` (bad_rows.py): the
validation pass collects all of them, then stops with one error naming them or, with ``data.on_bad_row=skip``,
leaves them out and reports them.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .bad_rows import BadRow, count_reasons, error_message, in_file_order, listing, skip_summary, split_where

logger = logging.getLogger(__name__)

TRUE_LABELS = ("true", "1", "like", "liked", "desirable", "yes", "good", "win")
FALSE_LABELS = ("false", "0", "dislike", "disliked", "undesirable", "no", "bad", "lose")
MAX_PROMPT_CHARS = 10_000  # far beyond any text encoder's context (CLIP: 77 tokens, T5: 512); longer is a data bug
INSTALL_HINT = "pip install diffusion-kto[data]"


class FeedbackError(ValueError):
    """A problem with feedback data; the message names the file, the row and the key or column."""


class MissingExtraError(FeedbackError, ImportError):
    """An optional dependency needed for this source is not installed; the message names the pip extra."""


class RowError(FeedbackError):
    """A problem confined to one row (the rest of the source is readable); `reason` is what counts group it by."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.bad_row = BadRow(where, reason, detail)


@dataclass(frozen=True)
class FeedbackRow:
    """One piece of feedback: an image (a path or encoded bytes), its prompt, and whether it was liked."""

    image: Path | bytes
    prompt: str
    desirable: bool
    where: str


@dataclass(frozen=True)
class FeedbackSummary:
    """Counts of a validated feedback set: the rows kept, and the bad rows skipped per reason."""

    n: int
    n_desirable: int
    n_undesirable: int
    n_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """"117 rows (95 liked, 22 disliked)", then "; skipped 3 of 120 rows: 2 missing image, ..." if any were."""
        text = f"{self.n} rows ({self.n_desirable} liked, {self.n_undesirable} disliked)"
        return text + (f"; {skip_summary(self.skipped, self.n + self.n_skipped)}" if self.n_skipped else "")


Entry = FeedbackRow | BadRow  # what readers return for each row of a source


# ---------------------------------------------------------------------------------------------- labels and fields


def parse_label(value: Any, where: str, column: str = "label") -> bool:
    """Map a like/dislike label (bool, 1/0, or a word such as "like", "bad", "win") to desirable True/False."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        if value == 1:
            return True
        if value == 0:
            return False
    elif isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_LABELS:
            return True
        if word in FALSE_LABELS:
            return False
    shown = _short(value)
    raise RowError(
        where, "unknown label", f"column '{column}': unknown label {shown}; accepted (case-insensitive): "
        f"liked = True, {', '.join(TRUE_LABELS)}; disliked = False, {', '.join(FALSE_LABELS)}"
    )


def _short(value: Any, limit: int = 60) -> str:
    """repr() of a value, cut to `limit` characters so error messages stay readable."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _check_prompt(value: Any, where: str, column: str) -> str:
    """The prompt as a non-empty, encodable string of at most MAX_PROMPT_CHARS characters."""
    if value is None:
        raise RowError(where, "missing prompt", f"column '{column}': prompt is missing (null)")
    if not isinstance(value, str):
        kind = type(value).__name__
        raise RowError(where, "invalid prompt", f"column '{column}': prompt must be text, got {kind} {_short(value)}")
    if not value.strip():
        raise RowError(where, "empty prompt", f"column '{column}': prompt is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise RowError(
            where, "invalid prompt", f"column '{column}': prompt is {len(value)} characters long "
            f"(limit {MAX_PROMPT_CHARS}); is a column or a quote misplaced?"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError(where, "invalid prompt", f"column '{column}': prompt is not valid unicode ({err.reason})") from None
    return value


def _check_image(value: Any, where: str, column: str, base: Path | None) -> Path | bytes:
    """The image as a path (relative ones resolved against `base`) or encoded bytes."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return _check_image(data, where, column, base)
        if path is not None:
            return _check_image(path, where, column, base)
        raise RowError(where, "missing image", f"column '{column}': image has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise RowError(where, "unreadable image", f"column '{column}': image bytes are empty")
        return bytes(value)
    if isinstance(value, Image.Image):
        return _png_bytes(value)
    if isinstance(value, Path):
        value = str(value)
    if value is None:
        raise RowError(where, "missing image", f"column '{column}': image is missing (null)")
    if not isinstance(value, str):
        raise RowError(
            where, "invalid image", f"column '{column}': image must be a path, bytes or a {{'bytes', 'path'}} "
            f"record, got {type(value).__name__} {_short(value)}"
        )
    if not value.strip():
        raise RowError(where, "missing image", f"column '{column}': image path is empty")
    if "\x00" in value:
        raise RowError(where, "invalid image", f"column '{column}': image path {_short(value)} contains a NUL character")
    path = Path(value)  # no "~" expansion: a data file names files, not users' homes
    return path if path.is_absolute() or base is None else base / path


def _png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG bytes (how decoded HF `Image` values are kept)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _make_row(record: dict, where: str, columns: tuple[str, str, str], base: Path | None) -> Entry:
    """A FeedbackRow from one record that has all three columns, or the BadRow saying what is wrong with it."""
    image_column, prompt_column, label_column = columns
    try:
        return FeedbackRow(
            image=_check_image(record[image_column], where, image_column, base),
            prompt=_check_prompt(record[prompt_column], where, prompt_column),
            desirable=_parse_present_label(record[label_column], where, label_column),
            where=where,
        )
    except RowError as err:
        return err.bad_row


def _parse_present_label(value: Any, where: str, column: str) -> bool:
    """parse_label, with a clearer message for a null label."""
    if value is None:
        raise RowError(where, "missing label", f"column '{column}': label is missing (null)")
    return parse_label(value, where, column)


def _missing_columns(present: Iterable[str], columns: tuple[str, str, str], where: str, kind: str) -> None:
    """Raise if any wanted column is absent, listing the ones present."""
    present = list(present)
    roles = ("image_column", "prompt_column", "label_column")
    for role, name in zip(roles, columns):
        if name not in present:
            listed = ", ".join(repr(p) for p in present) or "none"
            raise FeedbackError(
                f"{where}: no {kind} '{name}' ({kind}s present: {listed}); "
                f"pick the right one with {role}= (data.{role} in the config)"
            )


# ---------------------------------------------------------------------------------------------- readers


def _decode(data: bytes, name: str) -> str:
    """UTF-8 text of a file (a BOM is dropped); a decoding error names the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise FeedbackError(f"{name}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _read_bytes(path: Path, name: str) -> bytes:
    """The bytes of a data file, as a FeedbackError when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise FeedbackError(f"{name}: cannot read ({err.strerror or err})") from None


def _read_jsonl(path: Path, name: str, columns: tuple[str, str, str], base: Path) -> list[Entry]:
    """Rows of a JSON-lines file: one object per line, blank lines skipped."""
    records = _jsonl_records(_read_bytes(path, name), name)
    return [_jsonl_entry(record, f"{name}:{number}", columns, base) for number, record in records]


def _jsonl_entry(record: dict | BadRow, where: str, columns: tuple[str, str, str], base: Path) -> Entry:
    """The row of one JSON-lines record: a line that is already a BadRow stays one, as does a missing key."""
    if isinstance(record, BadRow):
        return record
    missing = _missing_key(record, columns)
    return BadRow(where, "missing key", missing) if missing else _make_row(record, where, columns, base)


def _check_keys(record: dict, keys: Sequence[str], where: str) -> None:
    """Raise if a JSON record lacks one of `keys`, listing the keys it has (streamed shards stop on it)."""
    missing = _missing_key(record, keys)
    if missing:
        raise FeedbackError(f"{where}: {missing}")


def _missing_key(record: dict, keys: Sequence[str]) -> str | None:
    """The message for the first of `keys` that a JSON record lacks, listing the keys it has; None if all present."""
    for key in keys:
        if key not in record:
            present = ", ".join(repr(k) for k in record) or "none"
            return f"missing key '{key}' (keys present: {present})"
    return None


def _jsonl_records(data: bytes, name: str) -> Iterator[tuple[int, dict | BadRow]]:
    """(1-based line number, object or BadRow) for each non-blank line of a JSON-lines file."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = _decode_line(raw, name, number)
            if line.strip():
                yield number, _json_object(line, f"{name}:{number}")
        except RowError as err:
            yield number, err.bad_row


def _json_object(line: str, where: str) -> dict:
    """One line of a JSON-lines file parsed as a JSON object."""
    try:
        record = json.loads(line)
    except RecursionError:
        raise RowError(where, "malformed row", "malformed JSON (nested too deeply)") from None
    except ValueError as err:
        raise RowError(where, "malformed row", f"malformed JSON ({_first_line(err)})") from None
    if not isinstance(record, dict):
        raise RowError(where, "malformed row", f"expected a JSON object {{...}}, got {type(record).__name__}")
    return record


def _decode_line(raw: bytes, name: str, number: int) -> str:
    """One line of a JSON-lines file as text (BOM and trailing CR dropped)."""
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8").removesuffix("\r")
    except UnicodeDecodeError as err:
        raise RowError(
            f"{name}:{number}", "malformed row", f"not valid UTF-8 ({err.reason} at column {err.start + 1})"
        ) from None


def _first_line(err: Exception) -> str:
    """The first line of an exception's message, shortened."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:200]


def _read_csv(
    path: Path, name: str, columns: tuple[str, str, str], base: Path, delimiter: str = ","
) -> list[Entry]:
    """Rows of a CSV (or TSV) file with a header line; line numbers count physical lines, header = 1."""
    text = _decode(_read_bytes(path, name), name)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise FeedbackError(f"{name}: file is empty (expected a header line with {', '.join(columns)})")
        _missing_columns(header, columns, f"{name}:1", "column")
        rows, start = [], reader.line_num + 1
        for fields in reader:
            where = f"{name}:{start}"
            start = reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                rows.append(BadRow(where, "malformed row", f"row has {len(fields)} fields but the header has "
                                   f"{len(header)} (a prompt with an unquoted comma?)"))
                continue
            rows.append(_make_row(dict(zip(header, fields)), where, columns, base))
    except csv.Error as err:
        raise FeedbackError(f"{name}:{reader.line_num + 1}: malformed CSV ({err})") from None
    return rows


def _pyarrow_parquet():
    """pyarrow.parquet, or a MissingExtraError naming the extra that installs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError(f"reading parquet feedback needs pyarrow: {INSTALL_HINT}") from None
    return pq


def _read_parquet(path: Path, name: str, columns: tuple[str, str, str], base: Path) -> list[Entry]:
    """Rows of a parquet file; image structs {bytes, path} are accepted as written by HF datasets."""
    pq = _pyarrow_parquet()
    try:
        schema = pq.read_schema(path)
        _missing_columns(schema.names, columns, name, "column")
        table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
    except FeedbackError:
        raise
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
        raise FeedbackError(f"{name}: cannot read parquet ({_first_line(err)})") from None
    return _rows_from_columns({c: table.column(c).to_pylist() for c in set(columns)}, name, columns, base)


def _rows_from_columns(
    data: dict[str, list], name: str, columns: tuple[str, str, str], base: Path | None, offset: int = 0
) -> list[Entry]:
    """Rows from column lists; `where` is name[index] with the 0-based index (counted from `offset`)."""
    n = len(data[columns[0]])
    return [_make_row({c: data[c][i] for c in columns}, f"{name}[{offset + i}]", columns, base) for i in range(n)]


def _import_datasets():
    """The `datasets` module, or a MissingExtraError naming the extra that installs it."""
    try:
        import datasets
    except ImportError:
        raise MissingExtraError(
            f"reading Hugging Face datasets (save_to_disk folders, hub ids) needs `datasets`: {INSTALL_HINT}"
        ) from None
    return datasets


def _read_hf_dataset(dataset, name: str, columns: tuple[str, str, str], split: str) -> list[Entry]:
    """Rows of a datasets.Dataset (or the `split` of a DatasetDict), images kept encoded."""
    datasets = _import_datasets()
    if isinstance(dataset, (datasets.DatasetDict, dict)):
        if split not in dataset:
            raise FeedbackError(f"{name}: no split '{split}' (splits: {', '.join(dataset)}); pick one with split=")
        dataset, name = dataset[split], f"{name} ({split})"
    _missing_columns(dataset.column_names, columns, name, "column")
    dataset = dataset.select_columns(list(dict.fromkeys(columns)))
    feature = dataset.features.get(columns[0])
    if isinstance(feature, datasets.Image) and feature.decode:
        dataset = dataset.cast_column(columns[0], datasets.Image(decode=False))
    rows: list[Entry] = []
    for batch in dataset.iter(batch_size=1000):
        rows.extend(_rows_from_columns(batch, name, columns, None, offset=len(rows)))
    return rows


def _read_saved_dataset(folder: Path, name: str, columns: tuple[str, str, str], split: str) -> list[Entry]:
    """Rows of a folder written by datasets' save_to_disk."""
    datasets = _import_datasets()
    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as err:
        raise FeedbackError(f"{name}: cannot load the saved dataset ({_first_line(err)})") from None
    return _read_hf_dataset(dataset, name, columns, split)


def _read_hub(dataset_id: str, columns: tuple[str, str, str], split: str) -> list[Entry]:
    """Rows of a Hugging Face hub dataset (the last resort when `path` is not local)."""
    try:
        datasets = _import_datasets()
    except MissingExtraError as err:
        raise MissingExtraError(f"'{dataset_id}' is not a local file or folder; {err}") from None
    try:
        dataset = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:
        raise FeedbackError(
            f"{dataset_id}: not a local file or folder, and loading it as a hub dataset failed ({_first_line(err)})"
        ) from None
    return _read_hf_dataset(dataset, f"{dataset_id}", columns, split)


_FILE_READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _read_folder(folder: Path, name: str, columns: tuple[str, str, str], split: str) -> list[Entry]:
    """Rows of an image folder (metadata.jsonl / metadata.csv / feedback.jsonl beside the images) or a save_to_disk
    folder; feedback.jsonl is what ``dkto demo`` and ``dkto convert`` write."""
    for metadata in ("metadata.jsonl", "metadata.csv", "feedback.jsonl"):
        if (folder / metadata).is_file():
            image_column = columns[0]
            present = _metadata_columns(folder / metadata, str(Path(name) / metadata))
            if image_column == "image" and "image" not in present and "file_name" in present:
                columns = ("file_name", *columns[1:])  # the HF imagefolder convention
            reader = _FILE_READERS[Path(metadata).suffix]
            return reader(folder / metadata, str(Path(name) / metadata), columns, folder)
    if any((folder / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
        return _read_saved_dataset(folder, name, columns, split)
    raise FeedbackError(
        f"{name}: folder has no metadata.jsonl, metadata.csv or feedback.jsonl and is not a datasets save_to_disk folder"
    )


def _metadata_columns(path: Path, name: str) -> set[str]:
    """Keys of the first record (JSONL) or the header (CSV) of an image folder's metadata file."""
    data = _read_bytes(path, name)
    if path.suffix == ".csv":
        first = next(csv.reader(io.StringIO(_decode(data, name), newline="")), [])
        return set(first)
    for _, record in _jsonl_records(data, name):
        if isinstance(record, dict):
            return set(record)
    return set()


def _expand_home(path: Path) -> Path:
    """`~` expanded where a home directory is known; the path unchanged otherwise."""
    try:
        return path.expanduser()
    except RuntimeError:
        return path


def _looks_local(text: str) -> bool:
    """Whether a missing `path` was clearly meant as a local file rather than a hub dataset id."""
    path = Path(text)
    return (
        path.suffix.lower() in (*_FILE_READERS, ".tsv")
        or path.is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or "\\" in text
    )


def _is_official_csv(path: Path, label_column: str) -> bool:
    """Whether a CSV is in the official Diffusion-KTO layout (see data/convert.py)."""
    from .convert import is_official_csv

    return is_official_csv(path, label_column)


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
    """Read feedback rows from a .jsonl / .csv / .parquet file, an image folder, a save_to_disk folder or a hub id.

    A CSV in the official Diffusion-KTO layout (file_name, caption, split) is labelled by `policy` (data/convert.py).
    Rows with a problem of their own (unknown label, empty prompt, ...) raise one FeedbackError naming them all;
    when `bad_rows` is a list they are appended to it instead and left out (the validation pass decides).
    """
    columns = (image_column, prompt_column, label_column)
    name = str(path)
    local = _expand_home(Path(path))
    if local.is_dir():
        rows = _read_folder(local, name, columns, split)
    elif local.is_file():
        suffix = local.suffix.lower()
        if suffix == ".tsv":
            rows = _read_csv(local, name, columns, local.parent, delimiter="\t")
        elif suffix == ".csv" and _is_official_csv(local, label_column):
            from .convert import read_official_csv

            rows = read_official_csv(local, policy)
        elif suffix in _FILE_READERS:
            rows = _FILE_READERS[suffix](local, name, columns, local.parent)
        else:
            raise FeedbackError(f"{name}: unsupported file type '{suffix}' (use .jsonl, .csv, .tsv or .parquet)")
    elif _looks_local(name):
        raise FeedbackError(f"{name}: no such file or folder")
    else:
        rows = _read_hub(name, columns, split)
    if not rows:
        raise FeedbackError(f"{name}: no feedback rows (the dataset is empty)")
    return _keep_good(rows, bad_rows)


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
        detail = f"{label} cannot be read as an image ({type(err).__name__}: {_first_line(err)})"
        return BadRow(row.where, "unreadable image", detail)
    return None


def _check_classes(rows: Sequence[FeedbackRow], n_skipped: int) -> None:
    """Raise unless both liked and disliked rows are left (the `kto` objective needs both)."""
    n_desirable = sum(1 for row in rows if row.desirable)
    source = split_where(rows[0].where)[0]
    after = f" after skipping {n_skipped} bad row{'s' if n_skipped > 1 else ''}" if n_skipped else ""
    checks = ((n_desirable, "liked", "disliked"), (len(rows) - n_desirable, "disliked", "liked"))
    for count, missing, present in checks:
        if count == 0:
            raise FeedbackError(
                f"{source}: no {missing} rows (all {len(rows)} rows are {present}{after}); the `kto` objective needs "
                f"both liked and disliked rows (or set desirable_ratio to 0 / 1 with an objective that allows it)"
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
) -> Screened:
    """The validation pass: every bad row (read_feedback's `bad_rows` and broken images) raises one error naming
    them all or, with `skip`, is left out and logged with counts per reason; then the class check for `kto`."""
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
        _check_classes(kept, len(bad))
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
        problem = image_problem(row) or f"{row.where}: image cannot be decoded ({type(err).__name__}: {_first_line(err)})"
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
