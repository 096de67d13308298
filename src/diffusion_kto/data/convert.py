"""Conversions into unpaired like/dislike feedback: Pick-a-Pic v2, paired preferences, the official CSV.

Each conversion tallies the comparisons every image took part in (wins, losses, ties), categorizes the image
and labels it with a policy (policies.py: the paper's §5 rule and the official script's variants), then writes
out_dir/feedback.jsonl (plus images/ for images that came as bytes) and out_dir/conversion.json with the counts.
Sources are read with the one reader stack (records.py): local files and folders, or hub ids, streamed.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .official import official_rows
from .output import (
    IMAGES_DIR,
    image_key,
    prepare_out_dir,
    relative_to,
    remove_if_empty,
    store_image,
    write_image,
    write_jsonl,
)
from .policies import CATEGORIES, POLICIES, categorize, check_ties, resolve_policy
from .records import FEEDBACK_FILE, Columns, Record, source_records
from .rows import FeedbackError, check_image, check_prompt, or_raise

logger = logging.getLogger(__name__)

PICKAPIC_ID = "yuvalkirstain/pickapic_v2"
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "image_0_uid", "image_1_uid")
SUMMARY_FILE = "conversion.json"


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


# ---------------------------------------------------------------------------------------------- writing


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
    if not records:
        raise FeedbackError(f"{summary.source}: no image kept under policy {summary.policy} (ties: {summary.ties})")
    write_jsonl(out / FEEDBACK_FILE, records)
    summary.images = len(tallies.items)
    _write_summary(out, summary, categories, [r["label"] for r in records])
    for line in summary.lines():
        logger.info(line)
    return summary


def _write_summary(out: Path, summary: ConversionSummary, categories: Counter, labels: list[bool]) -> None:
    """Count the images per category and the kept labels, write conversion.json, drop an empty images/ folder."""
    summary.categories = {c: categories.get(c, 0) for c in CATEGORIES}
    summary.liked = sum(labels)
    summary.disliked = len(labels) - summary.liked
    summary.dropped = summary.images - len(labels)
    (out / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    remove_if_empty(out / IMAGES_DIR)


# ---------------------------------------------------------------------------------------------- Pick-a-Pic


def pickapic_outcomes(label_0: Any, label_1: Any) -> tuple[str, str] | None:
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
    if pickapic_outcomes(record["label_0"], record["label_1"]) is None:
        return "invalid label"
    if not isinstance(record["caption"], str) or not record["caption"].strip():
        return "empty caption"
    try:
        check_prompt(record["caption"], "", "caption")
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
    policy, ties = resolve_policy(policy), check_ties(ties)
    out = prepare_out_dir(out_dir)
    summary = ConversionSummary(str(src), str(out), policy, ties)
    tallies, skipped = _Tallies(), Counter()
    for record in _progress(_strict(src, Columns(PICKAPIC_COLUMNS, ("has_label",)), split), progress, "rows"):
        if limit is not None and summary.rows_read >= limit:
            break
        summary.rows_read += 1
        fields = record.fields  # column -> value of one Pick-a-Pic comparison
        reason = _pickapic_skip_reason(fields)
        if reason:
            skipped[reason] += 1
            continue
        outcomes = pickapic_outcomes(fields["label_0"], fields["label_1"])
        for side, outcome in zip("01", outcomes):
            uid = str(fields[f"image_{side}_uid"])
            if uid not in tallies:
                tallies.add(uid, fields["caption"], write_image(out, uid, _jpeg_bytes(record, side)))
            tallies.record(uid, outcome)
    summary.rows_skipped = dict(skipped)
    return _finish(out, tallies, summary)


def _jpeg_bytes(record: Record, side: str) -> bytes:
    """The encoded image of one side ("0" or "1") of a Pick-a-Pic row (column jpg_0 / jpg_1)."""
    data = check_image(record.fields[f"jpg_{side}"], record.where, f"jpg_{side}", None)
    if not isinstance(data, bytes):
        raise FeedbackError(f"{record.where}: column 'jpg_{side}': expected encoded image bytes")
    return data


def _strict(src: str | Path, columns: Columns, split: str) -> Iterator[Record]:
    """The records of a source (hub ids streamed); a malformed row stops the conversion with its error."""
    return map(or_raise, source_records(src, columns, split=split, streaming=True))


def _progress(items: Iterable, enabled: bool, unit: str):
    """`items` wrapped in a tqdm bar when enabled."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit=f" {unit}", mininterval=2.0)


# ---------------------------------------------------------------------------------------------- paired data


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
    out = prepare_out_dir(out_dir)
    summary = ConversionSummary(str(src), str(out), policy, "neither")
    tallies, skipped = _Tallies(), Counter()
    columns = (prompt_column, chosen_column, rejected_column)
    for record in _progress(_strict(src, Columns(columns), split), progress, "pairs"):
        summary.rows_read += 1
        where, fields, base = record.where, record.fields, record.base
        prompt = check_prompt(fields[prompt_column], where, prompt_column)
        chosen = check_image(fields[chosen_column], where, chosen_column, base)
        rejected = check_image(fields[rejected_column], where, rejected_column, base)
        keys = (image_key(chosen), prompt), (image_key(rejected), prompt)
        if keys[0] == keys[1]:
            skipped["same image twice"] += 1
            continue
        for key, image, outcome in zip(keys, (chosen, rejected), ("win", "lose")):
            if key not in tallies:
                tallies.add(key, prompt, store_image(out, image))
            tallies.record(key, outcome)
    summary.rows_skipped = dict(skipped)
    return _finish(out, tallies, summary)


# ---------------------------------------------------------------------------------------------- official CSV


def official_csv_to_feedback(
    src: str | Path, out_dir: str | Path, policy: str = "win_intermediate"
) -> ConversionSummary:
    """The official CSV → out_dir/feedback.jsonl with the policy's labels (images referenced, not copied)."""
    policy = resolve_policy(policy)
    rows, categories, skipped = official_rows(Path(src), policy)
    out = prepare_out_dir(out_dir)
    summary = ConversionSummary(str(src), str(out), policy, "n/a (categories come from the CSV)")
    write_jsonl(out / FEEDBACK_FILE, ({"image": relative_to(r.image, out), "prompt": r.prompt, "label": r.desirable}
                                      for r in rows))
    summary.rows_read = summary.images = sum(categories.values())
    summary.rows_skipped = dict(skipped)
    _write_summary(out, summary, categories, [r.desirable for r in rows])
    return summary
