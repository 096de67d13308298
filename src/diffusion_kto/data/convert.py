"""Conversions into (and out of) unpaired like/dislike feedback: Pick-a-Pic v2, paired preferences, official CSV.

Diffusion-KTO (arXiv 2404.04465 §5) turns Pick-a-Pic v2's pairwise choices into per-image labels: "an image
preferred at least once is desirable", 237,530 liked and 690,538 disliked images. The official code reads the
result as a CSV (`file_name`, `caption`, `split` ∈ exclusive_win / exclusive_lose / intersections) and picks the
labels with `--policy`; it ships no conversion script. Here every comparison an image took part in is tallied
(wins, losses, ties) and the image falls into one category:

* ``win``: won at least once, never lost (official ``exclusive_win``)
* ``intermediate``: won at least once and lost at least once (official ``intersections``)
* ``lose``: lost at least once, never won (official ``exclusive_lose``)
* ``tie_only``: only ties counted (no wins, no losses); never labelled

Ties (label_0 = label_1 = 0.5) follow ``ties``: ``neither`` (default; a tie is neither a win nor a loss),
``win`` (a tie counts as a win for both images) or ``lose`` (a loss for both). Policies map categories to labels:

* ``win_intermediate`` (default; official ``gt_label_wi_l``): liked = win + intermediate, disliked = lose
* ``win_only`` (official ``gt_label_w_l``): liked = win, disliked = lose, intermediate dropped
* ``win_vs_rest`` (official ``gt_label_w_il``): liked = win, disliked = intermediate + lose

``tie_only`` images are dropped under every policy. How the paper counted ties is not stated (see docs/data.md).
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .feedback import INSTALL_HINT, FeedbackError, FeedbackRow, _check_image, _check_prompt, _decode, _read_bytes

logger = logging.getLogger(__name__)

PICKAPIC_ID = "yuvalkirstain/pickapic_v2"
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid")
CATEGORIES = ("win", "intermediate", "lose", "tie_only")
POLICIES = {  # category -> liked (True) / disliked (False); absent = dropped
    "win_intermediate": {"win": True, "intermediate": True, "lose": False},
    "win_only": {"win": True, "lose": False},
    "win_vs_rest": {"win": True, "intermediate": False, "lose": False},
}
OFFICIAL_POLICIES = {"gt_label_wi_l": "win_intermediate", "gt_label_w_l": "win_only", "gt_label_w_il": "win_vs_rest"}
OFFICIAL_SPLITS = {"exclusive_win": "win", "intersections": "intermediate", "exclusive_lose": "lose"}
OFFICIAL_COLUMNS = ("file_name", "caption", "split")
TIE_RULES = ("neither", "win", "lose")
FEEDBACK_FILE = "feedback.jsonl"
PAIRS_FILE = "pairs.jsonl"
SUMMARY_FILE = "conversion.json"
IMAGES_DIR = "images"
_BATCH_ROWS = 64  # parquet rows per batch: Pick-a-Pic rows carry two ~0.5 MB JPEGs


# ---------------------------------------------------------------------------------------------- policies


def resolve_policy(policy: str) -> str:
    """The canonical policy name; the official script's names (gt_label_wi_l, ...) are accepted too."""
    name = OFFICIAL_POLICIES.get(policy, policy)
    if name not in POLICIES:
        choices = ", ".join([*POLICIES, *OFFICIAL_POLICIES])
        raise FeedbackError(f"unknown policy {policy!r}; choose one of {choices}")
    return name


def _check_ties(ties: str) -> str:
    """`ties` itself when it is a known tie rule."""
    if ties not in TIE_RULES:
        raise FeedbackError(f"unknown tie rule {ties!r}; choose one of {', '.join(TIE_RULES)}")
    return ties


def categorize(wins: int, losses: int, ties: int = 0, tie_rule: str = "neither") -> str:
    """The category (win / intermediate / lose / tie_only) of an image from its comparison counts."""
    if tie_rule == "win":
        wins += ties
    elif tie_rule == "lose":
        losses += ties
    if wins and losses:
        return "intermediate"
    if wins:
        return "win"
    if losses:
        return "lose"
    return "tie_only"


def policy_label(category: str, policy: str = "win_intermediate") -> bool | None:
    """Liked (True), disliked (False) or dropped (None) for an image category under a policy."""
    return POLICIES[resolve_policy(policy)].get(category)


# ---------------------------------------------------------------------------------------------- tallies


@dataclass
class _Tally:
    """The comparisons one image took part in, with its prompt and its file inside the output folder."""

    prompt: str
    image: str
    wins: int = 0
    losses: int = 0
    ties: int = 0


@dataclass
class ConversionSummary:
    """What a conversion read, how images were categorized and labelled, and what it wrote."""

    source: str
    out_dir: str
    policy: str
    ties: str
    rows_read: int = 0
    rows_skipped: dict[str, int] = field(default_factory=dict)
    images: int = 0
    categories: dict[str, int] = field(default_factory=dict)
    liked: int = 0
    disliked: int = 0
    dropped: int = 0

    def lines(self) -> list[str]:
        """Human-readable lines with the counts per class (what `dkto convert` prints)."""
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.rows_skipped.items()))
        cats = ", ".join(f"{c.replace('_', ' ')} {self.categories.get(c, 0)}" for c in CATEGORIES)
        return [
            f"read {self.rows_read} rows from {self.source}" + (f" (skipped: {skipped})" if skipped else ""),
            f"{self.images} unique images: {cats}",
            f"policy {self.policy} (ties: {self.ties}): {self.liked} liked, {self.disliked} disliked, "
            f"{self.dropped} dropped",
            f"wrote {Path(self.out_dir) / FEEDBACK_FILE}",
        ]


class _Tallies:
    """Per-image comparison counts, keyed by an image identity, in order of first appearance."""

    def __init__(self):
        """Start with no images."""
        self.items: dict[Any, _Tally] = {}

    def __contains__(self, key) -> bool:
        """Whether the image was seen already."""
        return key in self.items

    def add(self, key, prompt: str, image: str) -> None:
        """Register an image the first time it is seen (its first prompt and file are kept)."""
        self.items.setdefault(key, _Tally(prompt, image))

    def record(self, key, outcome: str) -> None:
        """Count one comparison outcome ("win", "lose" or "tie") for a registered image."""
        tally = self.items[key]
        if outcome == "win":
            tally.wins += 1
        elif outcome == "lose":
            tally.losses += 1
        else:
            tally.ties += 1

    def labelled(self, policy: str, ties: str) -> Iterator[tuple[_Tally, str, bool | None]]:
        """(tally, category, label) for every image, label None when the policy drops it."""
        for tally in self.items.values():
            category = categorize(tally.wins, tally.losses, tally.ties, ties)
            yield tally, category, POLICIES[policy].get(category)


# ---------------------------------------------------------------------------------------------- output folder


def _prepare_out_dir(out_dir: str | Path, with_images: bool = True) -> Path:
    """Create the output folder (and its images/ folder); refuse one that exists and is not empty."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FeedbackError(f"{out}: output folder exists and is not empty; choose another --out")
    (out / IMAGES_DIR if with_images else out).mkdir(parents=True, exist_ok=True)
    return out


def _safe_stem(name: str) -> str:
    """A file-name-safe stem: `name` itself when it is plain (a UUID), else its SHA-1."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        return name
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


def _image_suffix(data: bytes) -> str:
    """A file suffix from an encoded image's magic bytes (".img" when unknown; PIL does not need it)."""
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return ".gif"
    return ".img"


def _write_image(out: Path, stem: str, data: bytes) -> str:
    """Write encoded image bytes under out/images/; return the path relative to `out` (POSIX form)."""
    relative = f"{IMAGES_DIR}/{_safe_stem(stem)}{_image_suffix(data)}"
    (out / relative).write_bytes(data)
    return relative


def _relative_to(path: Path, out: Path) -> str:
    """`path` written relative to `out` when possible (feedback files resolve paths against their folder)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), out.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(Path(path).resolve())


def _write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write records as JSON lines through a temporary file, so a failed run leaves no partial file."""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def _finish(out: Path, tallies: _Tallies, summary: ConversionSummary) -> ConversionSummary:
    """Label every image, write feedback.jsonl and conversion.json, delete images the policy dropped."""
    records, categories = [], Counter()
    for tally, category, label in tallies.labelled(summary.policy, summary.ties):
        categories[category] += 1
        if label is None:
            if tally.image.startswith(f"{IMAGES_DIR}/"):
                (out / tally.image).unlink(missing_ok=True)
            continue
        records.append({"image": tally.image, "prompt": tally.prompt, "label": label, "category": category,
                        "wins": tally.wins, "losses": tally.losses, "ties": tally.ties})
    summary.images = len(tallies.items)
    summary.categories = {c: categories.get(c, 0) for c in CATEGORIES}
    summary.liked = sum(1 for r in records if r["label"])
    summary.disliked = len(records) - summary.liked
    summary.dropped = summary.images - len(records)
    if not records:
        raise FeedbackError(f"{summary.source}: no image kept under policy {summary.policy} (ties: {summary.ties})")
    _write_jsonl(out / FEEDBACK_FILE, records)
    (out / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    _remove_if_empty(out / IMAGES_DIR)
    for line in summary.lines():
        logger.info(line)
    return summary


def _remove_if_empty(folder: Path) -> None:
    """Remove a folder that ended up empty (conversions that only reference existing files)."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


# ---------------------------------------------------------------------------------------------- sources


def _parquet_files(src: Path, split: str) -> list[Path]:
    """The parquet files of a file or folder; in a folder, those named `<split>-*` when any are."""
    if src.is_file():
        return [src]
    files = sorted(p for p in src.rglob("*.parquet") if p.is_file())
    in_split = [p for p in files if p.name.startswith(f"{split}-")]
    if not files:
        raise FeedbackError(f"{src}: folder holds no .parquet files")
    return in_split or files


def _parquet_records(path: Path, columns: Sequence[str], optional: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(where, record) for each row of one parquet file, reading only the wanted columns."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading parquet needs pyarrow: {INSTALL_HINT}") from None
    try:
        handle = pq.ParquetFile(path)
    except Exception as err:  # ArrowInvalid, OSError, ...
        raise FeedbackError(f"{path}: cannot read parquet ({err})") from None
    present = handle.schema_arrow.names
    _require_columns(present, columns, str(path))
    wanted = [*columns, *(c for c in optional if c in present and c not in columns)]
    index = 0
    for batch in handle.iter_batches(batch_size=_BATCH_ROWS, columns=wanted):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            yield f"{path}[{index}]", {c: data[c][i] for c in wanted}
            index += 1


def _require_columns(present: Iterable[str], columns: Sequence[str], where: str) -> None:
    """Raise a FeedbackError naming the first missing column and the columns present."""
    present = list(present)
    for column in columns:
        if column not in present:
            listed = ", ".join(repr(p) for p in present) or "none"
            raise FeedbackError(f"{where}: no column '{column}' (columns present: {listed})")


def _text_records(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(where, record) for each row of a JSONL or CSV file (1-based line numbers)."""
    text = _decode(_read_bytes(path, str(path)), str(path))
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        _require_columns(reader.fieldnames or [], columns, f"{path}:1")
        for record in reader:
            yield f"{path}:{reader.line_num}", record
        return
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise FeedbackError(f"{path}:{number}: malformed JSON ({str(err)[:200]})") from None
        if not isinstance(record, dict):
            raise FeedbackError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        _require_columns(record, columns, f"{path}:{number}")
        yield f"{path}:{number}", record


def _hub_records(
    dataset_id: str, columns: Sequence[str], optional: Sequence[str], split: str
) -> Iterator[tuple[str, dict]]:
    """(where, record) for each row of a Hugging Face hub dataset, streamed (images kept encoded)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"'{dataset_id}' is not a local file or folder; hub datasets need `datasets`: {INSTALL_HINT}"
        ) from None
    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
    except Exception as err:
        raise FeedbackError(
            f"{dataset_id}: not a local file or folder, and streaming it from the hub failed ({err})"
        ) from None
    features = stream.features or {}
    if features:
        _require_columns(features, columns, dataset_id)
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            stream = stream.cast_column(name, datasets.Image(decode=False))
    wanted = [*columns, *(c for c in optional if c not in columns)]
    for index, record in enumerate(stream):
        if index == 0 and not features:
            _require_columns(record, columns, dataset_id)
        yield f"{dataset_id}[{index}]", {c: record.get(c) for c in wanted}


def _records(src: str | Path, columns: Sequence[str], optional: Sequence[str] = (), split: str = "train"):
    """(where, record, base folder for relative image paths) for each row of a local file, folder or hub id."""
    local = Path(src).expanduser()
    if local.is_dir() or (local.is_file() and local.suffix.lower() == ".parquet"):
        for path in _parquet_files(local, split):
            for where, record in _parquet_records(path, columns, optional):
                yield where, record, path.parent
    elif local.is_file() and local.suffix.lower() in (".jsonl", ".ndjson", ".csv"):
        for where, record in _text_records(local, columns):
            yield where, record, local.parent
    elif local.is_file():
        raise FeedbackError(f"{src}: unsupported file type '{local.suffix}' (use .parquet, .jsonl or .csv)")
    elif str(src).count("/") == 1 and not str(src).startswith((".", "/", "~")):
        for where, record in _hub_records(str(src), columns, optional, split):
            yield where, record, None
    else:
        raise FeedbackError(f"{src}: no such file or folder")


# ---------------------------------------------------------------------------------------------- Pick-a-Pic


def _pickapic_outcomes(label_0: Any, label_1: Any) -> tuple[str, str] | None:
    """The outcomes of both images of one Pick-a-Pic row, or None for labels that are not 1/0, 0/1 or ½/½."""
    try:
        pair = (float(label_0), float(label_1))
    except (TypeError, ValueError):
        return None
    return {(1.0, 0.0): ("win", "lose"), (0.0, 1.0): ("lose", "win"), (0.5, 0.5): ("tie", "tie")}.get(pair)


def _pickapic_skip_reason(record: dict) -> str | None:
    """Why a Pick-a-Pic row cannot be counted (unlabelled, same image twice, bad label, no caption), or None."""
    if record.get("has_label") is False:
        return "unlabelled"
    if record["image_0_uid"] is None or record["image_1_uid"] is None:
        return "missing uid"
    if record["image_0_uid"] == record["image_1_uid"]:
        return "same image twice"
    if _pickapic_outcomes(record["label_0"], record["label_1"]) is None:
        return "invalid label"
    if not isinstance(record["caption"], str) or not record["caption"].strip():
        return "empty caption"
    try:
        _check_prompt(record["caption"], "", "caption")
    except FeedbackError:
        return "invalid caption"
    return None


def pickapic_to_feedback(
    src: str | Path = PICKAPIC_ID,
    out_dir: str | Path = "pickapic-feedback",
    policy: str = "win_intermediate",
    *,
    ties: str = "neither",
    split: str = "train",
    limit: int | None = None,
    progress: bool = False,
) -> ConversionSummary:
    """Pick-a-Pic v2 rows (local parquet file/folder or hub id) → images + feedback.jsonl, one row per image."""
    policy, ties = resolve_policy(policy), _check_ties(ties)
    out = _prepare_out_dir(out_dir)
    summary = ConversionSummary(str(src), str(out), policy, ties)
    tallies, skipped = _Tallies(), Counter()
    records = _records(src, PICKAPIC_COLUMNS, ("has_label",), split)
    for where, record, _ in _progress(records, progress, "rows"):
        if limit is not None and summary.rows_read >= limit:
            break
        summary.rows_read += 1
        reason = _pickapic_skip_reason(record)
        if reason:
            skipped[reason] += 1
            continue
        outcomes = _pickapic_outcomes(record["label_0"], record["label_1"])
        for side, outcome in zip("01", outcomes):
            uid = str(record[f"image_{side}_uid"])
            if uid not in tallies:
                data = _check_image(record[f"jpg_{side}"], where, f"jpg_{side}", None)
                if not isinstance(data, bytes):
                    raise FeedbackError(f"{where}: column 'jpg_{side}': expected encoded image bytes")
                tallies.add(uid, record["caption"], _write_image(out, uid, data))
            tallies.record(uid, outcome)
    summary.rows_skipped = dict(skipped)
    return _finish(out, tallies, summary)


def _progress(items: Iterable, enabled: bool, unit: str):
    """`items` wrapped in a tqdm bar when enabled."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit=f" {unit}", mininterval=2.0)


# ---------------------------------------------------------------------------------------------- paired data


def _image_key(image: Path | bytes) -> str:
    """An identity for an image: its resolved path, or the SHA-1 of its bytes."""
    if isinstance(image, bytes):
        return "sha1:" + hashlib.sha1(image).hexdigest()
    return "path:" + str(Path(image).resolve())


def _store_image(out: Path, image: Path | bytes) -> str:
    """Bytes written under out/images/ (named by content hash); a path referenced relative to `out`."""
    if isinstance(image, bytes):
        return _write_image(out, hashlib.sha1(image).hexdigest(), image)
    return _relative_to(image, out)


def pairs_to_feedback(
    src: str | Path,
    out_dir: str | Path,
    policy: str = "win_intermediate",
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    split: str = "train",
    progress: bool = False,
) -> ConversionSummary:
    """Paired preferences (prompt, chosen, rejected) → unpaired feedback: chosen = a win, rejected = a loss.

    An image met once becomes liked (chosen) or disliked (rejected); an image in several pairs (same image and
    prompt) is categorized from all its wins and losses and labelled by `policy`, exactly as for Pick-a-Pic.
    Images given as bytes are written under out_dir/images/; image paths are referenced, not copied.
    """
    policy = resolve_policy(policy)
    out = _prepare_out_dir(out_dir)
    summary = ConversionSummary(str(src), str(out), policy, "neither")
    tallies, skipped = _Tallies(), Counter()
    columns = (prompt_column, chosen_column, rejected_column)
    for where, record, base in _progress(_records(src, columns, (), split), progress, "pairs"):
        summary.rows_read += 1
        prompt = _check_prompt(record[prompt_column], where, prompt_column)
        chosen = _check_image(record[chosen_column], where, chosen_column, base)
        rejected = _check_image(record[rejected_column], where, rejected_column, base)
        keys = (_image_key(chosen), prompt), (_image_key(rejected), prompt)
        if keys[0] == keys[1]:
            skipped["same image twice"] += 1
            continue
        for key, image, outcome in zip(keys, (chosen, rejected), ("win", "lose")):
            if key not in tallies:
                tallies.add(key, prompt, _store_image(out, image))
            tallies.record(key, outcome)
    summary.rows_skipped = dict(skipped)
    return _finish(out, tallies, summary)


@dataclass(frozen=True)
class PreferencePair:
    """A liked and a disliked image for the same prompt (for pairwise objectives such as Diffusion-DPO)."""

    prompt: str
    chosen: FeedbackRow
    rejected: FeedbackRow


def _spread_pairs(n_liked: int, n_disliked: int) -> Iterator[tuple[int, int]]:
    """Index pairs covering liked × disliked diagonal by diagonal, so early pairs reuse images least."""
    for offset in range(n_disliked):
        for i in range(n_liked):
            yield i, (i + offset) % n_disliked


def feedback_to_pairs(
    rows: Sequence[FeedbackRow], max_pairs_per_prompt: int | None = 4, seed: int = 0
) -> list[PreferencePair]:
    """Same-prompt liked × disliked rows → pairs, at most `max_pairs_per_prompt` per prompt; deterministic.

    Per prompt, liked and disliked rows are shuffled with a generator seeded by (seed, prompt), then paired
    diagonal by diagonal: the first min(#liked, #disliked) pairs use distinct images on both sides. Prompts
    appear in order of first appearance; prompts without both a liked and a disliked row give no pair.
    """
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1 or None, got {max_pairs_per_prompt}")
    groups: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for row in rows:
        groups[row.prompt][0 if row.desirable else 1].append(row)
    pairs = []
    for prompt, (liked, disliked) in groups.items():
        if not liked or not disliked:
            continue
        rng = random.Random(f"{seed}:{prompt}")
        liked, disliked = rng.sample(liked, len(liked)), rng.sample(disliked, len(disliked))
        candidates = (
            PreferencePair(prompt, liked[i], disliked[j])
            for i, j in _spread_pairs(len(liked), len(disliked))
            if _image_key(liked[i].image) != _image_key(disliked[j].image)  # a conflicting duplicate: no pair
        )
        pairs.extend(itertools.islice(candidates, max_pairs_per_prompt))
    return pairs


def write_pairs(pairs: Sequence[PreferencePair], out_dir: str | Path) -> Path:
    """Write pairs as out_dir/pairs.jsonl (prompt, chosen, rejected); image bytes go to out_dir/images/."""
    if not pairs:
        raise FeedbackError("no pairs to write: no prompt has both a liked and a disliked image")
    out = _prepare_out_dir(out_dir)
    stored: dict[str, str] = {}

    def store(row: FeedbackRow) -> str:
        """The stored path of a row's image, each distinct image stored once."""
        key = _image_key(row.image)
        if key not in stored:
            stored[key] = _store_image(out, row.image)
        return stored[key]

    records = ({"prompt": p.prompt, "chosen": store(p.chosen), "rejected": store(p.rejected)} for p in pairs)
    _write_jsonl(out / PAIRS_FILE, records)
    _remove_if_empty(out / IMAGES_DIR)
    return out / PAIRS_FILE


# ---------------------------------------------------------------------------------------------- official CSV


def is_official_csv(path: str | Path, label_column: str = "label") -> bool:
    """Whether a CSV has the official Diffusion-KTO header (file_name, caption, split) and no `label_column`."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return set(OFFICIAL_COLUMNS) <= set(header) and label_column not in header


def _read_official(path: Path, policy: str) -> tuple[list[FeedbackRow], Counter, Counter]:
    """Rows kept by `policy`, the count per category, and the count of rows skipped per reason."""
    rows, categories, skipped = [], Counter(), Counter()
    for where, record in _text_records(path, OFFICIAL_COLUMNS):
        category = OFFICIAL_SPLITS.get((record["split"] or "").strip())
        if category is None:
            raise FeedbackError(
                f"{where}: column 'split': unknown value {record['split']!r}; "
                f"expected one of {', '.join(OFFICIAL_SPLITS)}"
            )
        categories[category] += 1
        label = POLICIES[policy].get(category)
        if label is None:
            continue
        if not (record["caption"] or "").strip():
            skipped["empty caption"] += 1
            continue
        image = _check_image(record["file_name"], where, "file_name", path.parent)
        rows.append(FeedbackRow(image, _check_prompt(record["caption"], where, "caption"), label, where))
    if skipped:
        logger.warning("%s: skipped %d row(s) with an empty caption", path, skipped["empty caption"])
    if not rows:
        raise FeedbackError(f"{path}: no feedback rows under policy {policy} (rows per split: {dict(categories)})")
    return rows, categories, skipped


def read_official_csv(path: str | Path, policy: str = "win_intermediate") -> list[FeedbackRow]:
    """Feedback rows from the official Diffusion-KTO CSV (file_name, caption, split), labelled by `policy`.

    `file_name` is relative to the CSV's folder (the official `--train_data_dir`). Rows the policy drops are
    left out; rows with an empty caption (the official code trains them with "") are skipped with a warning.
    """
    return _read_official(Path(path), resolve_policy(policy))[0]


def official_csv_to_feedback(
    src: str | Path, out_dir: str | Path, policy: str = "win_intermediate"
) -> ConversionSummary:
    """The official CSV → out_dir/feedback.jsonl with the policy's labels (images referenced, not copied)."""
    policy = resolve_policy(policy)
    rows, categories, skipped = _read_official(Path(src), policy)
    out = _prepare_out_dir(out_dir)
    summary = ConversionSummary(str(src), str(out), policy, "n/a (categories come from the CSV)")
    _write_jsonl(out / FEEDBACK_FILE, ({"image": _relative_to(r.image, out), "prompt": r.prompt, "label": r.desirable}
                                       for r in rows))
    _remove_if_empty(out / IMAGES_DIR)
    summary.rows_read = summary.images = sum(categories.values())
    summary.rows_skipped = dict(skipped)
    summary.categories = {c: categories.get(c, 0) for c in CATEGORIES}
    summary.liked = sum(r.desirable for r in rows)
    summary.disliked = len(rows) - summary.liked
    summary.dropped = summary.images - len(rows)
    (out / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    return summary
