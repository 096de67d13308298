"""The official Diffusion-KTO CSV: `file_name`, `caption`, `split` ∈ exclusive_win / intersections / exclusive_lose.

`file_name` is relative to the CSV's folder (the official `--train_data_dir`); the split is the image's category
(policies.py) and a policy picks the labels. read_feedback reads such a CSV directly; `dkto convert official-csv`
(convert.py) writes it out as feedback.jsonl.
"""
from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

from .policies import POLICIES, resolve_policy
from .records import Columns, csv_records
from .rows import FeedbackError, FeedbackRow, check_image, check_prompt, or_raise

logger = logging.getLogger(__name__)

OFFICIAL_SPLITS = {"exclusive_win": "win", "intersections": "intermediate", "exclusive_lose": "lose"}
OFFICIAL_COLUMNS = ("file_name", "caption", "split")


def is_official_csv(path: str | Path, label_column: str = "label") -> bool:
    """Whether a CSV has the official Diffusion-KTO header (file_name, caption, split) and no `label_column`."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return set(OFFICIAL_COLUMNS) <= set(header) and label_column not in header


def official_rows(path: Path, policy: str) -> tuple[list[FeedbackRow], Counter, Counter]:
    """Rows kept by the canonical `policy`, the count per category, and the count of rows skipped per reason; the
    first malformed row or unknown split stops the reading."""
    rows, categories, skipped = [], Counter(), Counter()
    for record in map(or_raise, csv_records(path, str(path), Columns(OFFICIAL_COLUMNS), path.parent)):
        where, fields = record.where, record.fields  # fields: column -> text
        category = OFFICIAL_SPLITS.get(fields["split"].strip())
        if category is None:
            raise FeedbackError(
                f"{where}: column 'split': unknown value {fields['split']!r}; "
                f"expected one of {', '.join(OFFICIAL_SPLITS)}"
            )
        categories[category] += 1
        label = POLICIES[policy].get(category)
        if label is None:
            continue
        if not fields["caption"].strip():
            skipped["empty caption"] += 1
            continue
        image = check_image(fields["file_name"], where, "file_name", path.parent)
        rows.append(FeedbackRow(image, check_prompt(fields["caption"], where, "caption"), label, where))
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
    return official_rows(Path(path), resolve_policy(policy))[0]
