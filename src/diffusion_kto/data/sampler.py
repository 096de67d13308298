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


_PAIR_TAG = 0x6B746F_5302  # the pair draws' own stream


class PairedDrawSampler(DesirableSampler):
    """The γ-sampler with same-prompt pairs on shared draws (kto_paired, docs/method.md): the first 2k positions of
    each global batch, k = min(⌊G / 2⌋, ⌈pair_share · G / 2⌉), are k (liked, disliked) pairs of one prompt whose
    two images share one draw id (so one noise, t, crop and flip); the other G − 2k positions are the γ-draws of
    :class:`DesirableSampler`. A pair: a prompt drawn uniformly among those with both labels, then one liked and one
    disliked row of it, uniformly. Without such a prompt k = 0 and every draw is the γ-sampler's, bit for bit."""

    def __init__(self, desirable: Sequence[bool], prompts: Sequence[str], desirable_ratio: float, *,
                 pair_share: float, **kwargs):
        """Index the rows of every prompt that has a liked and a disliked row."""
        super().__init__(desirable, desirable_ratio, **kwargs)
        if not (math.isfinite(pair_share) and 0.0 <= pair_share <= 1.0):
            raise ValueError(f"pair_share must be in [0, 1], got {pair_share}")
        if len(prompts) != len(desirable):
            raise ValueError(f"{len(prompts)} prompts for {len(desirable)} rows")
        by_prompt: dict[str, tuple[list[int], list[int]]] = {}
        for i, (prompt, liked) in enumerate(zip(prompts, desirable)):
            by_prompt.setdefault(prompt, ([], []))[0 if liked else 1].append(i)
        self.pairable = [(np.asarray(a), np.asarray(b)) for a, b in by_prompt.values() if a and b]
        g = self.global_batch_size
        self.pairs_per_step = min(g // 2, math.ceil(pair_share * g / 2)) if self.pairable else 0  # k

    def pair(self, step: int, j: int) -> tuple[int, int]:
        """The (liked row, disliked row) of pair j of global step ``step``, from (seed, step) only."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [self.seed % 2**64, _PAIR_TAG, int(step), int(j)])))
        liked, disliked = self.pairable[int(rng.integers(len(self.pairable)))]
        return int(liked[rng.integers(len(liked))]), int(disliked[rng.integers(len(disliked))])

    def draws_for_step(self, step: int) -> list[tuple[int, int]]:
        """This rank's slice of the global batch: pair positions p < 2k take pair p // 2 with the draw id
        s·G + 2(p // 2) of its first image; the others are γ-draw s·G + p."""
        first = step * self.global_batch_size
        out = []
        for p in range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size):
            if p < 2 * self.pairs_per_step:
                out.append((self.pair(step, p // 2)[p % 2], first + p - p % 2))
            else:
                out.append(self.draw(first + p))
        return out


def build_sampler(desirable: Sequence[bool], prompts: Sequence[str] | None, desirable_ratio: float,
                  pair_share: float, **kwargs) -> DesirableSampler:
    """The γ-sampler, or :class:`PairedDrawSampler` when an objective asks for a share of pairs (> 0)."""
    if pair_share > 0 and prompts is not None:
        return PairedDrawSampler(desirable, prompts, desirable_ratio, pair_share=pair_share, **kwargs)
    return DesirableSampler(desirable, desirable_ratio, **kwargs)


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
