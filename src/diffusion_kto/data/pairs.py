"""Preference pairs: a preferred and a rejected image of the same prompt, for pairwise objectives (Diffusion-DPO).

Diffusion-DPO (Wallace et al. 2024) trains on (preferred, rejected) pairs of the same prompt. They come from paired
data as given (`load_pairs`): a ``pairs.jsonl`` / CSV / parquet with ``prompt``, ``chosen`` and ``rejected`` columns
(image paths relative to the file, as `write_pairs` and ``dkto convert to-pairs`` write them), or a Pick-a-Pic-style
parquet with ``caption``, ``jpg_0``, ``jpg_1``, ``label_0``, ``label_1`` (ties dropped); `pair_format` tells such a
source by its columns. Otherwise they are formed from same-prompt liked x disliked feedback rows (`feedback_to_pairs`).
Training serves them as items that share one draw (`PairDataset`, `collate_pairs`): one noise and t per pair.
"""
from __future__ import annotations

import itertools
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .bad_rows import BadRow, count_reasons, error_message, in_file_order, listing, skip_summary
from .convert import pickapic_outcomes
from .dataset import FeedbackDataset, collate
from .feedback import FeedbackSummary, Screened, image_problem
from .output import IMAGES_DIR, image_key, prepare_out_dir, remove_if_empty, store_image, write_jsonl
from .records import Columns, Record, column_names, find_metadata, locate, parquet_files, source_records
from .rows import FeedbackError, FeedbackRow, RowError, check_image, check_prompt

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
PAIR_COLUMNS = ("chosen", "rejected")  # beside the prompt column: what `write_pairs` writes
PICKAPIC_PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")  # one Pick-a-Pic comparison per row


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
    groups: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))  # prompt -> (liked rows, disliked rows)
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
            if image_key(liked[i].image) != image_key(disliked[j].image)  # a conflicting duplicate: no pair
        )
        pairs.extend(itertools.islice(candidates, max_pairs_per_prompt))
    return pairs


def write_pairs(pairs: Sequence[PreferencePair], out_dir: str | Path) -> Path:
    """Write pairs as out_dir/pairs.jsonl (prompt, chosen, rejected); image bytes go to out_dir/images/."""
    if not pairs:
        raise FeedbackError("no pairs to write: no prompt has both a liked and a disliked image")
    out = prepare_out_dir(out_dir)
    stored: dict[str, str] = {}  # image_key -> path written in pairs.jsonl

    def store(row: FeedbackRow) -> str:
        """The stored path of a row's image, each distinct image stored once."""
        key = image_key(row.image)
        if key not in stored:
            stored[key] = store_image(out, row.image)
        return stored[key]

    records = ({"prompt": p.prompt, "chosen": store(p.chosen), "rejected": store(p.rejected)} for p in pairs)
    write_jsonl(out / PAIRS_FILE, records)
    remove_if_empty(out / IMAGES_DIR)
    return out / PAIRS_FILE


# ---------------------------------------------------------------------------------------------- paired sources


def _pair_file(local: Path) -> Path:
    """The file of a local pair source: a to-pairs folder's pairs.jsonl, a folder's first parquet file, or itself."""
    if local.is_dir() and (local / PAIRS_FILE).is_file():
        return local / PAIRS_FILE
    if local.is_dir() and find_metadata(local) is None:
        return next(iter(parquet_files(local, "train")), local)
    return local


def pair_format(src: str | Path | None, prompt_column: str = "prompt") -> str | None:
    """"pairs" when a local source has the prompt, ``chosen`` and ``rejected`` columns, "pickapic" when it has
    Pick-a-Pic's ``caption``, ``jpg_0``, ``jpg_1``, ``label_0``, ``label_1``; None otherwise (per-image feedback, hub
    ids and saved datasets, which are not inspected)."""
    try:
        local = locate(src) if src is not None else None
    except FeedbackError:
        return None
    if not isinstance(local, Path):
        return None
    path = _pair_file(local)
    if not path.is_file():
        return None
    columns = column_names(path, str(path))
    if {prompt_column, *PAIR_COLUMNS} <= columns:
        return "pairs"
    return "pickapic" if set(PICKAPIC_PAIR_COLUMNS) <= columns else None


def _pair(prompt: str, chosen, rejected, record: Record, columns: tuple[str, str]) -> PreferencePair:
    """A pair from one record's prompt and two image values (paths resolved against the record's folder)."""
    images = [check_image(v, record.where, c, record.base) for v, c in zip((chosen, rejected), columns)]
    if image_key(images[0]) == image_key(images[1]):
        raise RowError(record.where, "same image twice", f"columns '{columns[0]}' and '{columns[1]}' hold one image")
    return PreferencePair(prompt, FeedbackRow(images[0], prompt, True, record.where),
                          FeedbackRow(images[1], prompt, False, record.where))


def _pairs_entry(record: Record, prompt_column: str) -> PreferencePair:
    """The pair of one (prompt, chosen, rejected) record."""
    fields = record.fields
    prompt = check_prompt(fields[prompt_column], record.where, prompt_column)
    return _pair(prompt, fields["chosen"], fields["rejected"], record, PAIR_COLUMNS)


def _pickapic_entry(record: Record) -> PreferencePair | str:
    """The pair of one Pick-a-Pic row (the side labelled 1 is chosen), or why it is dropped ("tie", "unlabelled")."""
    fields = record.fields
    if fields.get("has_label") is False:
        return "unlabelled"
    outcomes = pickapic_outcomes(fields["label_0"], fields["label_1"])
    if outcomes is None:
        raise RowError(record.where, "unknown label", f"columns 'label_0', 'label_1': {fields['label_0']!r}, "
                       f"{fields['label_1']!r} is not a preference (1/0, 0/1, or 0.5/0.5 for a tie)")
    if outcomes == ("tie", "tie"):
        return "tie"
    prompt = check_prompt(fields["caption"], record.where, "caption")
    first = 0 if outcomes[0] == "win" else 1
    return _pair(prompt, fields[f"jpg_{first}"], fields[f"jpg_{1 - first}"], record,
                 (f"jpg_{first}", f"jpg_{1 - first}"))


def read_pairs(src: str | Path, *, prompt_column: str = "prompt", split: str = "train"
               ) -> tuple[list[PreferencePair], list[BadRow], dict[str, int]]:
    """(pairs, bad rows, dropped counts by reason) of a pair source (`pair_format`), every record through the one
    reader stack; images are not opened here (`screen_pairs` checks them)."""
    kind = pair_format(src, prompt_column)
    if kind is None:
        raise FeedbackError(f"{src}: not a pair source (needs {prompt_column}, chosen, rejected columns, or Pick-a-Pic's "
                            f"{', '.join(PICKAPIC_PAIR_COLUMNS)})")
    local = locate(src)
    path = local / PAIRS_FILE if local.is_dir() and (local / PAIRS_FILE).is_file() else src
    names = (prompt_column, *PAIR_COLUMNS) if kind == "pairs" else PICKAPIC_PAIR_COLUMNS
    pairs, bad, dropped = [], [], Counter()
    for record in source_records(path, Columns(names, optional=("has_label",)), split=split):
        if isinstance(record, BadRow):
            bad.append(record)
            continue
        try:
            entry = _pairs_entry(record, prompt_column) if kind == "pairs" else _pickapic_entry(record)
        except RowError as err:
            bad.append(err.bad_row)
            continue
        if isinstance(entry, str):
            dropped[entry] += 1
        else:
            pairs.append(entry)
    return pairs, bad, dict(dropped)


def load_pairs(src: str | Path, *, prompt_column: str = "prompt", skip: bool = False) -> Screened:
    """Read and screen a pair source: every bad row (a broken record, a missing or unreadable image on either side)
    raises one error naming them all or, with `skip` (data.on_bad_row=skip), is left out and logged. The rows of the
    result are the pairs' images, chosen then rejected."""
    pairs, bad, dropped = read_pairs(src, prompt_column=prompt_column)
    broken = {}
    for index, pair in enumerate(pairs):
        problem = image_problem(pair.chosen) or image_problem(pair.rejected)
        if problem is not None:
            broken[index] = problem
    bad = in_file_order([*bad, *broken.values()])
    kept = [pair for index, pair in enumerate(pairs) if index not in broken]
    total = len(pairs) + len(bad) - len(broken)
    if bad and (not skip or not kept):
        raise FeedbackError(error_message(bad, total))
    if not kept:
        raise FeedbackError(f"{src}: no preference pairs" + "".join(f"; dropped {n} ({w})" for w, n in dropped.items()))
    if bad:
        logger.warning("data.on_bad_row=skip: %s; first:\n%s", skip_summary(count_reasons(bad), total), listing(bad))
    rows = [row for pair in kept for row in (pair.chosen, pair.rejected)]
    summary = FeedbackSummary(len(rows), len(kept), len(kept), len(bad), count_reasons(bad), pairs=len(kept),
                              dropped=dropped)
    return Screened(rows, summary, bad, pairs=kept)


class PairDataset(torch.utils.data.Dataset):
    """Preference pairs as training items: both images share the draw id, hence crop, flip, noise and t."""

    def __init__(self, pairs: Sequence[PreferencePair], **transform):
        """Serve `pairs` through one FeedbackDataset of 2P rows: chosen at 2i, rejected at 2i + 1."""
        if not pairs:
            raise ValueError("no preference pairs: DPO needs prompts with both a liked and a disliked image")
        self.pairs = list(pairs)
        rows = [row for pair in self.pairs for row in (pair.chosen, pair.rejected)]
        self.images = FeedbackDataset(rows, **transform)

    def __len__(self) -> int:
        """Number of pairs."""
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[dict, dict]:
        """(chosen item, rejected item) of pair ``key[0]`` with draw id ``key[1]``."""
        index, draw_id = key
        return self.images[(2 * index, draw_id)], self.images[(2 * index + 1, draw_id)]


def collate_pairs(batch: Sequence[tuple[dict, dict]]) -> dict:
    """Stack P pairs into one batch of 2P images: all chosen first, then all rejected (same order)."""
    return collate([w for w, _ in batch] + [l for _, l in batch])
