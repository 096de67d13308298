"""Preference pairs: a liked and a disliked image of the same prompt, for pairwise objectives (Diffusion-DPO).

Diffusion-DPO trains on (preferred, rejected) pairs of the same prompt; here the pairs are formed from same-prompt
liked x disliked feedback rows (`feedback_to_pairs`), written as pairs.jsonl (`write_pairs`, read back by
``dkto convert pairs``), and served to training as items that share one draw (`PairDataset`, `collate_pairs`).
"""
from __future__ import annotations

import itertools
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .dataset import FeedbackDataset, collate
from .output import IMAGES_DIR, image_key, prepare_out_dir, remove_if_empty, store_image, write_jsonl
from .rows import FeedbackError, FeedbackRow

PAIRS_FILE = "pairs.jsonl"


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
