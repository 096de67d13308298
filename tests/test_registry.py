"""Registries (entry points declared in pyproject.toml): the shapes world's model alias, judges and prompt set
resolve by name without models/ or evaluation/ importing it, and an unknown or broken provider is one clear line."""
from importlib import metadata

import numpy as np
import pytest

from diffusion_kto import registry, toy
from diffusion_kto.config import ConfigError
from diffusion_kto.evaluation.judges import load_judge
from diffusion_kto.evaluation.prompts import PromptError, load_prompts
from diffusion_kto.evaluation.scorers import ScorerError, parse_metric
from diffusion_kto.models import resolve_pretrained
from diffusion_kto.toy import judges, world

GROUPS = (registry.MODELS, registry.SCORERS, registry.PROMPTS)


def test_the_shapes_world_is_registered_in_every_group():
    assert all("toy" in registry.names(group) for group in GROUPS)
    assert resolve_pretrained("toy") == str(toy.weights_dir())
    assert resolve_pretrained("org/model") == "org/model"  # hub ids and folders pass through
    assert load_judge("toy:preference").judge is judges.preference
    images = [world.render(p, rng=0) for p in world.eval_prompts()[:3]]
    scores = parse_metric("toy:fidelity").load("cpu")(images, world.eval_prompts()[:3])
    np.testing.assert_allclose(scores, judges.fidelity(images, world.eval_prompts()[:3]))
    prompts = load_prompts("toy")
    assert prompts.prompts == world.eval_prompts() and prompts.source == "diffusion_kto.toy.world.eval_prompts()"


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_unknown_provider_is_a_clear_one_line_error():
    with pytest.raises(ScorerError) as info:
        parse_metric("nope:preference")
    assert "unknown metric 'nope:preference'" in _one_line(info) and "toy:<judge>" in str(info.value)
    with pytest.raises(PromptError) as info:
        load_prompts("nope")
    assert "unknown prompt set 'nope'" in _one_line(info) and "'toy'" in str(info.value)
    with pytest.raises(ScorerError) as info:
        parse_metric("toy:nope").load("cpu")
    assert "provider 'toy' has no judge 'nope'" in _one_line(info)


def test_a_registered_provider_that_cannot_be_imported_is_a_clear_one_line_error(monkeypatch):
    def gone(group):
        return {"gone": metadata.EntryPoint("gone", "no_such_package_xyz.module:thing", group)}

    monkeypatch.setattr(registry, "_entry_points", gone)
    expected = "'gone' is registered in .* as 'no_such_package_xyz.module:thing', which cannot be loaded"
    with pytest.raises(ConfigError, match=expected) as info:
        resolve_pretrained("gone")
    assert "ModuleNotFoundError" in _one_line(info)
    with pytest.raises(ScorerError, match=expected) as info:
        parse_metric("gone:preference").load("cpu")
    _one_line(info)
    with pytest.raises(PromptError, match=expected) as info:
        load_prompts("gone")
    _one_line(info)
