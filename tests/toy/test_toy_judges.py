"""Toy judges: clean renders score high, every flaw is disliked, labels, and user judge loading."""
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
    liked = judges.label(judges.load_judge(judges.DEFAULT_JUDGE)(images, prompts))
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


def test_load_builtin_and_callable():
    assert judges.load_judge("preference") is judges.preference
    assert judges.load_judge(" fidelity ") is judges.fidelity
    assert judges.load_judge(judges.aesthetic) is judges.aesthetic


USER_JUDGE = '''
import numpy as np

def brightness(images, prompts):
    """Mean brightness in [0, 1]."""
    return np.array([np.asarray(im, dtype=float).mean() / 255 for im in images])

class Holder:
    always_half = staticmethod(lambda images, prompts: np.full(len(images), 0.5))

NOT_CALLABLE = 3
'''


def test_load_user_judge_from_a_file(tmp_path):
    path = tmp_path / "my_judge.py"
    path.write_text(USER_JUDGE)
    judge = judges.load_judge(f"{path}:brightness")
    images, prompts = _renders((), n=3)
    assert judge(images, prompts).shape == (3,)
    assert (judges.load_judge(f"{path}:Holder.always_half")(images, prompts) == 0.5).all()


def test_load_user_judge_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_judge_module.py").write_text(USER_JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = judges.load_judge("my_judge_module:brightness")
    assert judge.__name__ == "brightness"
    assert judges.load_judge("diffusion_kto.toy.judges:fidelity") is judges.fidelity


@pytest.mark.parametrize("spec, message", [
    ("no_such_judge", "not a built-in judge"),
    ("no_such_module_xyz:judge", "importing module 'no_such_module_xyz' failed"),
    ("diffusion_kto.toy.judges:nope", "has no attribute 'nope'"),
    ("missing/file.py:judge", "does not exist"),
    ("", "expected a built-in name"),
])
def test_load_judge_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        judges.load_judge(spec)
    assert repr(spec) in str(info.value)


def test_load_judge_rejects_non_callables_and_broken_files(tmp_path):
    path = tmp_path / "judge_file.py"
    path.write_text(USER_JUDGE)
    with pytest.raises(ValueError, match="not a callable"):
        judges.load_judge(f"{path}:NOT_CALLABLE")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="boom"):
        judges.load_judge(f"{broken}:judge")
