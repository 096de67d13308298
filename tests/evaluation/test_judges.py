"""Judge specs: registered provider:name judges, user judges from a module or a file, and errors naming the spec."""
from __future__ import annotations

import pytest

from diffusion_kto.evaluation.judges import load_judge
from diffusion_kto.toy import judges, world


def _renders(n: int):
    """n clean renders of grammar prompts, and their prompts."""
    prompts = world.all_prompts()[:n]
    return [world.render(p, rng=i) for i, p in enumerate(prompts)], prompts


def test_load_registered_and_callable():
    assert load_judge("toy:preference").judge is judges.preference
    assert load_judge(" toy:fidelity ").judge is judges.fidelity
    assert load_judge(judges.aesthetic).judge is judges.aesthetic


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
    judge = load_judge(f"{path}:brightness")
    images, prompts = _renders(3)
    assert judge(images, prompts).shape == (3,)
    assert (load_judge(f"{path}:Holder.always_half")(images, prompts) == 0.5).all()


def test_load_user_judge_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_judge_module.py").write_text(USER_JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = load_judge("my_judge_module:brightness")
    assert judge.judge.__name__ == "brightness" and judge.name.endswith(":brightness")
    assert load_judge("diffusion_kto.toy.judges:fidelity").judge is judges.fidelity


@pytest.mark.parametrize("spec, message", [
    ("no_such_judge", "not a registered judge"),
    ("toy:no_such_judge", "provider 'toy' has no judge 'no_such_judge'"),
    ("no_such_module_xyz:judge", "importing module 'no_such_module_xyz' failed"),
    ("diffusion_kto.toy.judges:nope", "has no attribute 'nope'"),
    ("missing/file.py:judge", "does not exist"),
    ("", "expected 'provider:name'"),
])
def test_load_judge_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        load_judge(spec)
    assert repr(spec) in str(info.value)


def test_load_judge_rejects_non_callables_and_broken_files(tmp_path):
    path = tmp_path / "judge_file.py"
    path.write_text(USER_JUDGE)
    with pytest.raises(ValueError, match="not a callable"):
        load_judge(f"{path}:NOT_CALLABLE")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="boom"):
        load_judge(f"{broken}:judge")


# ---------------------------------------------------------------- every call is checked (one line naming the judge)

BAD_JUDGES = '''
import numpy as np

def short(images, prompts):
    return np.full(len(images) - 1, 0.5)

def nan(images, prompts):
    scores = np.full(len(images), 0.5)
    scores[2] = np.nan
    return scores

def big(images, prompts):
    return np.full(len(images), 2.0)

def words(images, prompts):
    return ["good"] * len(images)
'''


@pytest.mark.parametrize("name, message", [
    ("short", "returned 2 scores for 3 images"),
    ("nan", "non-finite scores (NaN or inf), the first for image 2"),
    ("big", "outside [0, 1], the first for image 0: 2"),
    ("words", "scores that are not numbers"),
])
def test_checked_judges_refuse_unusable_scores(tmp_path, name, message):
    from diffusion_kto.errors import UserError
    from diffusion_kto.evaluation.judges import JudgeError

    (tmp_path / "bad.py").write_text(BAD_JUDGES)
    judge = load_judge(f"{tmp_path / 'bad.py'}:{name}", bounds=(0.0, 1.0))
    images, prompts = _renders(3)
    with pytest.raises(JudgeError, match=None) as err:
        judge(images, prompts)
    assert message in str(err.value) and f"bad.py:{name}" in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, UserError)


def test_unbounded_judges_accept_any_finite_score():
    """Reward models score on their own scales: only length and finiteness are checked without bounds."""
    from diffusion_kto.evaluation.judges import check_scores

    assert check_scores([-3.0, 21.5], 2, "pickscore").tolist() == [-3.0, 21.5]
