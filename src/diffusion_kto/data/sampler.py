"""The subjective-belief sampler of Diffusion-KTO (arXiv 2404.04465) §4.2.

"Each sample is drawn uniformly from all desirable samples with probability γ and uniformly from all undesirable
samples with probability 1 − γ" (γ = `desirable_ratio`).

Randomness is counter-based so that a resumed run and any number of processes see exactly the draws of one
uninterrupted single-process run:

* there is one global stream of draws k = 0, 1, 2, ...; draw k depends only on (seed, k);
* draws are made in blocks of BLOCK = 1024: block b = k // BLOCK comes from a generator seeded by (seed, b);
* sampler step s owns draws [s·G, (s+1)·G) with G = batch_size · world_size (the global batch); process `rank`
  takes the slice [s·G + rank·batch_size, s·G + (rank + 1)·batch_size).

So concatenating the ranks' batches of a step gives the single-process batch of size G, and `start_step=s` yields
the tail of the uninterrupted stream. A "step" here is one micro-batch: with gradient accumulation A, resume at
`start_step = optimizer_step · A`.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch.utils.data

BLOCK = 1024
_STREAM_TAG = 0x6B746F_5301  # keeps the sampler's stream apart from other users of the same seed


def _block_generator(seed: int, block: int) -> np.random.Generator:
    """A generator determined only by (seed, block): the counter-based source of draws."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) % 2**64, _STREAM_TAG, block])))


def _take_liked(rng: np.random.Generator, desirable_ratio: float) -> np.ndarray:
    """The class of each of a block's draws (True = liked, probability γ): the first BLOCK numbers of its generator."""
    return rng.random(BLOCK) < desirable_ratio


def liked_draws(seed: int, block: int, desirable_ratio: float) -> np.ndarray:
    """Whether each draw of block `block` is liked: the same classes as `DesirableSampler`, without its rows."""
    return _take_liked(_block_generator(seed, block), desirable_ratio)


class DesirableSampler(torch.utils.data.Sampler):
    """Infinite γ-sampler (§4.2) yielding (row_index, draw_id) for this rank, one batch_size slice per step."""

    def __init__(
        self,
        desirable: Sequence[bool],
        desirable_ratio: float,
        *,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ):
        """Index the liked / disliked rows and check that γ can be honoured by them."""
        super().__init__()
        flags = np.asarray([bool(d) for d in desirable], dtype=bool)
        _check_arguments(len(flags), float(desirable_ratio), batch_size, rank, world_size, start_step)
        self.liked = np.flatnonzero(flags)
        self.disliked = np.flatnonzero(~flags)
        _check_classes(len(self.liked), len(self.disliked), float(desirable_ratio))
        self.desirable_ratio = float(desirable_ratio)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start_step = int(start_step)
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        """G = batch_size · world_size: the number of draws one step consumes across all processes."""
        return self.batch_size * self.world_size

    def block(self, b: int) -> np.ndarray:
        """Rows of draws [b·BLOCK, (b+1)·BLOCK): liked with probability γ, uniform within the class (§4.2)."""
        if self._cached is not None and self._cached[0] == b:
            return self._cached[1]
        rng = _block_generator(self.seed, b)
        take_liked = _take_liked(rng, self.desirable_ratio)
        liked_pick = rng.integers(0, max(len(self.liked), 1), BLOCK)
        disliked_pick = rng.integers(0, max(len(self.disliked), 1), BLOCK)
        rows = np.empty(BLOCK, dtype=np.int64)
        if len(self.liked):
            rows[take_liked] = self.liked[liked_pick[take_liked]]
        if len(self.disliked):
            rows[~take_liked] = self.disliked[disliked_pick[~take_liked]]
        self._cached = (b, rows)
        return rows

    def draw(self, k: int) -> tuple[int, int]:
        """Global draw number k as (row_index, k)."""
        if k < 0:
            raise ValueError(f"draw number must be >= 0, got {k}")
        b, offset = divmod(int(k), BLOCK)
        return int(self.block(b)[offset]), int(k)

    def draws_for_step(self, step: int) -> list[tuple[int, int]]:
        """This rank's batch_size draws of sampler step `step`."""
        first = step * self.global_batch_size + self.rank * self.batch_size
        return [self.draw(k) for k in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(row_index, draw_id) forever, from start_step on; batch it with batch_size to get one step per batch."""
        step = self.start_step
        while True:
            yield from self.draws_for_step(step)
            step += 1


def _check_arguments(n: int, ratio: float, batch_size: int, rank: int, world_size: int, start_step: int) -> None:
    """ValueError for arguments no sampler can use."""
    if n == 0:
        raise ValueError("DesirableSampler needs at least one feedback row")
    if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
        raise ValueError(f"desirable_ratio must be in [0, 1], got {ratio}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")


def _check_classes(n_liked: int, n_disliked: int, ratio: float) -> None:
    """ValueError when γ asks for a class that has no rows."""
    if ratio > 0.0 and n_liked == 0:
        raise ValueError(
            f"desirable_ratio={ratio} draws liked rows, but there are no liked rows "
            "(use 0.0 to draw only disliked ones)"
        )
    if ratio < 1.0 and n_disliked == 0:
        raise ValueError(
            f"desirable_ratio={ratio} draws disliked rows, but there are no disliked rows "
            "(use 1.0 to draw only liked ones)"
        )
