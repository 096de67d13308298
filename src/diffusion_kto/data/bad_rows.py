"""Bad feedback rows: what was wrong with each, and how a set of them is reported.

The validation pass (feedback.py) turns every unusable row into a `BadRow`. With ``data.on_bad_row=error`` they
become one error that counts them per reason and names the first few; with ``skip`` the same counts go to the
log and the run summary, and every skipped row is written to ``skipped_rows.jsonl`` (never a silent drop).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LISTED = 5  # rows named in full in an error message or a log summary
SKIPPED_ROWS_FILE = "skipped_rows.jsonl"


@dataclass(frozen=True)
class BadRow:
    """One unusable row: where it is (``file:line`` or ``name[index]``), a short reason, and the full problem."""

    where: str
    reason: str  # e.g. "missing image", "unknown label", "empty prompt": what the counts are grouped by
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"

    def record(self) -> dict:
        """The row as a JSON-able record: file, row, reason and detail."""
        source, row = split_where(self.where)
        return {"file": source, "row": row, "reason": self.reason, "detail": self.detail}


def split_where(where: str) -> tuple[str, int | None]:
    """The file (or dataset) and row number of a `where`: "f.jsonl:3" -> ("f.jsonl", 3), "ds[0]" -> ("ds", 0)."""
    match = re.fullmatch(r"(.*?)(?::(\d+)|\[(\d+)\])", where, flags=re.DOTALL)
    if match is None:
        return where, None
    return match.group(1), int(match.group(2) or match.group(3))


def in_file_order(bad: Sequence[BadRow]) -> list[BadRow]:
    """Bad rows sorted by file, then row (problems found by different checks interleave)."""
    def key(row: BadRow) -> tuple[str, int]:
        source, number = split_where(row.where)
        return source, -1 if number is None else number

    return sorted(bad, key=key)


def count_reasons(bad: Sequence[BadRow]) -> dict[str, int]:
    """How many rows failed for each reason, most frequent first."""
    return dict(Counter(row.reason for row in bad).most_common())


def _reasons(counts: dict[str, int]) -> str:
    """"2 missing image, 1 unknown label"."""
    return ", ".join(f"{n} {reason}" for reason, n in counts.items())


def skip_summary(counts: dict[str, int], total: int) -> str:
    """"skipped 3 of 120 rows: 2 missing image, 1 unknown label"."""
    return f"skipped {sum(counts.values())} of {total} rows: {_reasons(counts)}"


def listing(bad: Sequence[BadRow], limit: int = LISTED) -> str:
    """The first `limit` bad rows in full, one per indented line, then how many more there are."""
    lines = [f"  {row}" for row in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def error_message(bad: Sequence[BadRow], total: int) -> str:
    """One message for every bad row found: counts per reason, advice, then the first rows named."""
    plural = "s" if len(bad) > 1 else ""
    if len(bad) < total:
        advice = "fix them, or set data.on_bad_row=skip to train on the other rows"
    else:
        advice = "no row is left to train on"
    return f"{len(bad)} bad row{plural} of {total} ({_reasons(count_reasons(bad))}); {advice}:\n{listing(bad)}"


def write_skipped_rows(bad: Sequence[BadRow], path: str | Path) -> Path:
    """Write one JSON record per skipped row (file, row, reason, detail) to `path`."""
    path = Path(path)
    path.write_text("".join(json.dumps(row.record()) + "\n" for row in bad), encoding="utf-8")  # ASCII: any path
    return path
