"""Toy judges: clean renders score high, every flaw is disliked, and labels."""
from __future__ import annotations

import time

import numpy as np
import pytest

from diffusion_kto.toy import judges, world


def _renders(flaws: tuple[str, ...], n: int = 120, seed: int = 0):
    """n renders of random grammar prompts with the given flaws, and their prompts."""
    rng = np.random.default_rng(seed)
    prompts = [world.all_prompts()[i] for i in rng.integers(0, len(world.all_prompts()), n)]
    return [world.render(p, flaws, rng) for p in prompts], prompts


def test_clean_renders_score_high_under_every_builtin():
    images, prompts = _renders(())
    for name, judge in judges.JUDGES.items():
        scores = judge(images, prompts)
        assert scores.shape == (len(images),) and ((0 <= scores) & (scores <= 1)).all(), name
        assert np.mean(scores > 0.8) >= 0.85, (name, scores.mean())


@pytest.mark.parametrize("flaw", world.FLAWS)
def test_each_flaw_is_disliked_by_the_default_judge(flaw):
    images, prompts = _renders((flaw,))
    liked = judges.label(judges.JUDGES[judges.DEFAULT_JUDGE](images, prompts))
    assert liked.mean() < 0.2, (flaw, liked.mean())


def test_fidelity_sees_colour_shape_and_background():
    image = world.render("a red circle on black", rng=0)
    right, *wrong = judges.fidelity([image] * 4, ["a red circle on black", "a blue circle on black",
                                                  "a red triangle on black", "a red circle on white"])
    assert right > 0.8 and max(wrong) < 0.5


def test_aesthetic_ignores_the_prompt_but_fidelity_does_not():
    image = world.render("a yellow square", rng=1)
    assert judges.aesthetic([image])[0] == judges.aesthetic([image], ["a blue circle"])[0] > 0.8


def test_judges_accept_uint8_arrays_and_other_sizes():
    images, prompts = _renders((), n=8)
    arrays = np.stack([np.asarray(im) for im in images])  # (8, 32, 32, 3) uint8
    big = [im.resize((64, 64)) for im in images]
    direct = judges.preference(images, prompts)
    np.testing.assert_allclose(judges.preference(arrays, prompts), direct)
    assert np.abs(judges.preference(big, prompts) - direct).max() < 0.2


def test_judges_check_prompts():
    images, prompts = _renders((), n=4)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        judges.preference(images, prompts[:3])
    with pytest.raises(ValueError, match="toy grammar"):
        judges.fidelity(images[:1], ["a photo of a cat"])


def test_judges_are_fast():
    images, prompts = _renders((), n=64)
    arrays = np.concatenate([np.stack([np.asarray(im) for im in images])] * 32)  # (2048, 32, 32, 3)
    start = time.perf_counter()
    judges.preference(arrays, prompts * 32)
    assert time.perf_counter() - start < 5.0  # ~1 s on a busy 2-core CPU


def test_label_threshold_and_noise():
    scores = np.linspace(0, 1, 1001)
    assert (judges.label(scores, threshold=0.5) == (scores >= 0.5)).all()
    noisy = judges.label(scores, flip_prob=0.2, rng=0)
    assert 0.15 < np.mean(noisy != (scores >= 0.5)) < 0.25
    assert (noisy == judges.label(scores, flip_prob=0.2, rng=0)).all()
    with pytest.raises(ValueError, match="flip_prob"):
        judges.label(scores, flip_prob=1.5)
