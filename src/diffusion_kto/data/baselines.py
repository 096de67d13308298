"""Data-side parts of the baseline objectives: CSFT prompt prefixes and Diffusion-DPO pairs.

CSFT (paper §5, after HPS v1) trains on both classes with the prompt prefixed by a quality phrase and samples
with the "good" phrase. Diffusion-DPO trains on (preferred, rejected) pairs of the same prompt; here the pairs
are formed from same-prompt liked x disliked feedback rows (:func:`diffusion_kto.data.convert.feedback_to_pairs`)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .convert import PreferencePair
from .dataset import FeedbackDataset, collate

CSFT_PHRASE = {True: "good image", False: "bad image"}


def csft_prompt(prompt: str, desirable: bool = True, position: str = "prefix") -> str:
    """The CSFT conditioning: "good image, <prompt>" for liked rows (and at sampling time), "bad image, ..." else;
    with ``position="suffix"``: "<prompt>, good image"."""
    phrase = CSFT_PHRASE[bool(desirable)]
    return f"{phrase}, {prompt}" if position == "prefix" else f"{prompt}, {phrase}"


class PairDataset(torch.utils.data.Dataset):
    """Preference pairs as training items: both images share the draw id, hence crop, flip, noise and t."""

    def __init__(self, pairs: Sequence[PreferencePair], **transform):
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
