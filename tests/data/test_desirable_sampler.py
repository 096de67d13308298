"""DesirableSampler (§4.2): share of liked draws ≈ γ, determinism, exact resume, rank slices = one big batch."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffusion_kto.data import DesirableSampler
from diffusion_kto.data.sampler import BLOCK

FLAGS = [True] * 7 + [False] * 13  # imbalanced on purpose: γ, not the data, sets the share


def take(sampler, n):
    """The first n draws of a sampler."""
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.8])
def test_share_of_liked_draws_is_gamma(gamma):
    n = 20_000
    draws = take(DesirableSampler(FLAGS, gamma, seed=3, batch_size=8), n)
    liked = sum(FLAGS[row] for row, _ in draws)
    assert abs(liked - gamma * n) < 5 * math.sqrt(n * gamma * (1 - gamma))


def test_draws_are_uniform_within_each_class():
    n = 40_000
    draws = take(DesirableSampler(FLAGS, 0.5, seed=0, batch_size=4), n)
    counts = torch.bincount(torch.tensor([row for row, _ in draws]), minlength=len(FLAGS)).float()
    for rows_of_class in ([i for i, f in enumerate(FLAGS) if f], [i for i, f in enumerate(FLAGS) if not f]):
        c = counts[rows_of_class]
        expected = c.sum() / len(rows_of_class)
        chi2 = float(((c - expected) ** 2 / expected).sum())
        assert chi2 < 3 * len(rows_of_class) + 20  # far above the 99.9% quantile for these degrees of freedom


def test_draw_ids_count_up_and_are_deterministic():
    a = take(DesirableSampler(FLAGS, 0.5, seed=11, batch_size=5), 3000)
    b = take(DesirableSampler(FLAGS, 0.5, seed=11, batch_size=5), 3000)
    c = take(DesirableSampler(FLAGS, 0.5, seed=12, batch_size=5), 3000)
    assert a == b and a != c
    assert [k for _, k in a] == list(range(3000))


@pytest.mark.parametrize("start_step", [1, 7, 204, 205, 1000])
def test_resume_gives_the_tail_of_the_uninterrupted_stream(start_step):
    batch = 5  # 5 does not divide BLOCK, so resumes land mid-block
    whole = take(DesirableSampler(FLAGS, 0.3, seed=1, batch_size=batch), (start_step + 3) * batch)
    resumed = take(DesirableSampler(FLAGS, 0.3, seed=1, batch_size=batch, start_step=start_step), 3 * batch)
    assert resumed == whole[start_step * batch :]


@pytest.mark.parametrize("world_size, batch_size", [(2, 3), (4, 1), (3, 7)])
def test_rank_slices_concatenate_to_the_single_process_batch(world_size, batch_size):
    steps = 2 * BLOCK // (world_size * batch_size) + 3  # crosses block boundaries
    single = DesirableSampler(FLAGS, 0.6, seed=9, batch_size=world_size * batch_size)
    ranks = [DesirableSampler(FLAGS, 0.6, seed=9, batch_size=batch_size, rank=r, world_size=world_size) for r in range(world_size)]
    single_draws = take(single, steps * world_size * batch_size)
    rank_draws = [take(s, steps * batch_size) for s in ranks]
    for step in range(steps):
        joined = [d for r in range(world_size) for d in rank_draws[r][step * batch_size : (step + 1) * batch_size]]
        assert joined == single_draws[step * world_size * batch_size : (step + 1) * world_size * batch_size]


def test_multi_rank_resume():
    full = DesirableSampler(FLAGS, 0.5, seed=4, batch_size=3, rank=1, world_size=2)
    resumed = DesirableSampler(FLAGS, 0.5, seed=4, batch_size=3, rank=1, world_size=2, start_step=10)
    assert take(resumed, 9) == take(full, 39)[30:]
    assert take(resumed, 3) == full.draws_for_step(10)


def test_gamma_one_with_no_disliked_rows_and_zero_with_no_liked_rows():
    assert all(row in range(4) for row, _ in take(DesirableSampler([True] * 4, 1.0, seed=0, batch_size=2), 100))
    assert all(row in range(4) for row, _ in take(DesirableSampler([False] * 4, 0.0, seed=0, batch_size=2), 100))
    only_liked = take(DesirableSampler(FLAGS, 1.0, seed=0, batch_size=2), 500)
    assert all(FLAGS[row] for row, _ in only_liked)


@pytest.mark.parametrize("flags, gamma", [([True] * 3, 0.5), ([False] * 3, 0.5), ([True] * 3, 0.0), ([False] * 3, 1.0)])
def test_a_needed_class_that_is_empty_is_a_value_error(flags, gamma):
    with pytest.raises(ValueError, match="no (liked|disliked) rows"):
        DesirableSampler(flags, gamma, seed=0, batch_size=2)


@pytest.mark.parametrize(
    "kwargs",
    [dict(desirable_ratio=1.5), dict(desirable_ratio=float("nan")), dict(batch_size=0), dict(rank=2, world_size=2),
     dict(start_step=-1), dict(world_size=0)],
)
def test_bad_arguments(kwargs):
    args = dict(desirable=FLAGS, desirable_ratio=0.5, seed=0, batch_size=2) | kwargs
    with pytest.raises(ValueError):
        DesirableSampler(**args)


def test_empty_rows_are_a_value_error():
    with pytest.raises(ValueError, match="at least one"):
        DesirableSampler([], 0.5, seed=0, batch_size=1)


def test_negative_seed_works():
    assert len(take(DesirableSampler(FLAGS, 0.5, seed=-5, batch_size=2), 10)) == 10


def test_works_as_a_dataloader_sampler():
    class Echo(torch.utils.data.Dataset):
        def __len__(self):
            return len(FLAGS)

        def __getitem__(self, key):
            return torch.tensor(key)

    sampler = DesirableSampler(FLAGS, 0.5, seed=2, batch_size=4)
    loader = torch.utils.data.DataLoader(Echo(), batch_size=4, sampler=sampler)
    batches = list(itertools.islice(iter(loader), 3))
    assert [tuple(x) for b in batches for x in b.tolist()] == take(sampler, 12)
