"""PairedDrawSampler (kto_paired): same-prompt (liked, disliked) pairs on one draw id in front of the gamma-draws,
deterministic, rank slices = one big batch, exact resume, and the gamma-sampler bit for bit without pairs."""
from __future__ import annotations

import itertools

import pytest

from diffusion_kto.data import DesirableSampler, PairedDrawSampler, build_sampler

# prompt p0: rows 0, 1 liked, 2 disliked; p1: 3 liked, 4 disliked; p2: 5, 6 liked only; p3: 7 disliked only
PROMPTS = ["p0", "p0", "p0", "p1", "p1", "p2", "p2", "p3"]
FLAGS = [True, True, False, True, False, True, True, False]


def take(sampler, n):
    """The first n draws of a sampler."""
    return list(itertools.islice(iter(sampler), n))


def test_pairs_come_first_share_a_draw_and_the_rest_are_the_gamma_draws():
    """batch 8, share 0.5 -> k = 2 pairs (positions 0-3), then 4 gamma-draws with the gamma-sampler's rows and ids."""
    paired = PairedDrawSampler(FLAGS, PROMPTS, 0.8, pair_share=0.5, seed=1, batch_size=8)
    plain = DesirableSampler(FLAGS, 0.8, seed=1, batch_size=8)
    assert paired.pairs_per_step == 2
    for step in range(50):
        draws = paired.draws_for_step(step)
        for j in range(2):
            (w, id_w), (l, id_l) = draws[2 * j], draws[2 * j + 1]
            assert FLAGS[w] and not FLAGS[l] and PROMPTS[w] == PROMPTS[l] and PROMPTS[w] in ("p0", "p1")
            assert id_w == id_l == step * 8 + 2 * j
        assert draws[4:] == plain.draws_for_step(step)[4:]
        ids = [d for _, d in draws]
        assert len(set(ids)) == 6  # two ids shared within the pairs, none across
    rows = {paired.pair(s, j) for s in range(200) for j in range(2)}
    assert rows == {(0, 2), (1, 2), (3, 4)}  # every (liked, disliked) combination of a pairable prompt is drawn


def test_without_a_prompt_of_both_labels_it_is_the_gamma_sampler():
    prompts = ["a", "a", "b", "b", "c", "c", "d", "d"]
    flags = [True, True, False, False, True, True, False, False]
    paired = PairedDrawSampler(flags, prompts, 0.5, pair_share=1.0, seed=4, batch_size=6)
    assert paired.pairs_per_step == 0
    assert take(paired, 300) == take(DesirableSampler(flags, 0.5, seed=4, batch_size=6), 300)


def test_share_zero_builds_the_gamma_sampler_and_deterministic_draws():
    assert type(build_sampler(FLAGS, PROMPTS, 0.8, 0.0, seed=0, batch_size=4)) is DesirableSampler
    assert type(build_sampler(FLAGS, None, 0.8, 0.5, seed=0, batch_size=4)) is DesirableSampler  # pair data as given
    a, b = (build_sampler(FLAGS, PROMPTS, 0.8, 0.5, seed=0, batch_size=4) for _ in range(2))
    assert type(a) is PairedDrawSampler and take(a, 200) == take(b, 200)


def test_rank_slices_make_the_single_process_batch_and_resume_is_exact():
    """2 ranks x batch 3 = global batch 6, k = 1 pair: its two images may sit on different ranks (the forward pass
    draws noise and t from the draw id alone, and the loss gathers partners over processes)."""
    kwargs = dict(pair_share=0.3, seed=7)
    single = PairedDrawSampler(FLAGS, PROMPTS, 0.6, batch_size=6, **kwargs)
    ranks = [PairedDrawSampler(FLAGS, PROMPTS, 0.6, batch_size=3, rank=r, world_size=2, **kwargs) for r in (0, 1)]
    assert single.pairs_per_step == ranks[0].pairs_per_step == 1
    for step in range(20):
        assert ranks[0].draws_for_step(step) + ranks[1].draws_for_step(step) == single.draws_for_step(step)
    resumed = PairedDrawSampler(FLAGS, PROMPTS, 0.6, batch_size=6, start_step=5, **kwargs)
    assert take(resumed, 60) == take(single, 90)[30:]


@pytest.mark.parametrize("share, batch, k", [(0.5, 2, 1), (0.1, 4, 1), (1.0, 5, 2), (0.5, 1, 0), (0.25, 16, 2)])
def test_pairs_per_step(share, batch, k):
    """k = min(floor(G / 2), ceil(share G / 2)): any share > 0 gets a pair into a batch of two."""
    assert PairedDrawSampler(FLAGS, PROMPTS, 0.5, pair_share=share, seed=0, batch_size=batch).pairs_per_step == k


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_bad_share_is_refused(share):
    with pytest.raises(ValueError, match="pair_share"):
        PairedDrawSampler(FLAGS, PROMPTS, 0.5, pair_share=share, seed=0, batch_size=4)


def test_prompts_must_match_the_rows():
    with pytest.raises(ValueError, match="7 prompts for 8 rows"):
        PairedDrawSampler(FLAGS, PROMPTS[:7], 0.5, pair_share=0.5, seed=0, batch_size=4)
