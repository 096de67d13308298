"""Guards that act (apps/guard_rollback.py): a demo run that destroys prompt fidelity is rolled back to the newest
checkpoint that keeps it, or to the base, says so in its metrics, report and card, and keeps its final weights."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion_kto.apps.demo import DemoSettings, run_demo
from diffusion_kto.apps import guard_rollback
from diffusion_kto.apps.guard_rollback import (GUARD_SEED, GuardPlan, checkpoint_overrides, chord, fidelity_bound,
                                              guard_set)
from diffusion_kto.models import resolve_pretrained
from diffusion_kto.toy import world


def test_checkpoints_and_guard_images_are_their_own():
    assert checkpoint_overrides(400, 8) == ["train.checkpoint_every=50", "train.keep_checkpoints=9"]
    assert checkpoint_overrides(3, 8) == ["train.checkpoint_every=1", "train.keep_checkpoints=9"]
    assert checkpoint_overrides(400, 0) == []
    prompts, seeds = guard_set(1, GuardPlan(groups=2, images=5))
    assert len(prompts) == len(seeds) == 15 * 10 and len(set(seeds)) == 150
    assert set(prompts) <= set(world.train_prompts()) and not set(prompts) & set(world.eval_prompts())
    assert min(seeds) >= GUARD_SEED  # disjoint from the feedback (seed x 1e6 + i) and evaluation (1e7 + ...) seeds


def test_fidelity_bound_is_paired_and_one_sided():
    """d = [0.1, -0.1, 0.1, -0.1] + 0.05: mean 0.05, sd 0.11547, se 0.057735; bound = base mean 0.5 + 0.05 - z se."""
    base = np.array([0.4, 0.6, 0.5, 0.5])
    scores = base + np.array([0.15, -0.05, 0.15, -0.05])
    assert fidelity_bound(scores, base, 0.0) == pytest.approx(0.55)
    assert fidelity_bound(scores, base, 1.64) == pytest.approx(0.55 - 1.64 * 0.1154701 / 2)
    assert fidelity_bound(base, base, 1.64) == pytest.approx(0.5)  # the base itself passes any share <= 1


def _unet(path):
    return load_file(str(path / "diffusion_pytorch_model.safetensors"))


def test_a_run_that_destroys_fidelity_rolls_back_to_the_base_and_says_so(tmp_path, capsys):
    out = tmp_path / "demo"
    metrics = run_demo(DemoSettings(out=out, budget=16, groups_per_prompt=1, guard_checks=2, guard_search="checkpoints",
                                    overrides=("train.max_steps=4", "train.batch_size=4", "optim.lr=1e-2")))  # wrecks it
    guarded = metrics["guard_rollback"]
    assert guarded["rolled_back"] and guarded["chosen_step"] == 0 and guarded["final_step"] == 4
    assert [c["step"] for c in guarded["checked"]] == [4, 2] and not any(c["passed"] for c in guarded["checked"])
    assert "rolled back to step 0, the base model" in capsys.readouterr().out
    base, exported = _unet(Path(resolve_pretrained("toy")) / "unet"), _unet(out / "model" / "unet")
    assert all(torch.equal(exported[k].float(), base[k].float()) for k in base)  # the export is the base again
    final = load_file(str(out / "model" / "checkpoints" / "checkpoint-00000004" / "weights.safetensors"))
    assert any(not torch.equal(final[k], exported[k]) for k in final)  # the final weights are kept, not lost
    assert metrics["aligned"]["fidelity"] == metrics["base"]["fidelity"]  # the evaluated model is the base
    assert "rolled back" in (out / "report.md").read_text() and "rolled back" in (out / "model" / "README.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["guard_rollback"]["chosen_step"] == 0


def test_a_run_that_keeps_the_guards_keeps_its_final_weights(tmp_path):
    out = tmp_path / "demo"
    metrics = run_demo(DemoSettings(out=out, budget=16, groups_per_prompt=1, guard_checks=2, overrides=(
        "train.max_steps=2", "train.batch_size=4", "optim.lr=1e-7")))
    guarded = metrics["guard_rollback"]
    assert not guarded["rolled_back"] and guarded["chosen_step"] == 2 and len(guarded["checked"]) == 1
    assert guarded["alpha"] == 1.0 and metrics["settings"]["guard_search"] == "chord"  # the default search
    final = load_file(str(out / "model" / "checkpoints" / "checkpoint-00000002" / "weights.safetensors"))
    exported = _unet(out / "model" / "unet")
    assert all(torch.equal(final[k], exported[k]) for k in final)


def test_guard_checks_zero_keeps_the_final_model_and_says_so(tmp_path):
    metrics = run_demo(DemoSettings(out=tmp_path / "demo", budget=16, groups_per_prompt=1, guard_checks=0,
                                    overrides=("train.max_steps=1", "train.batch_size=4")))
    assert metrics["guard_rollback"] is None and not (tmp_path / "demo" / "model" / "checkpoints").exists()


def test_chord_is_the_weight_space_line_from_the_start_to_the_final_weights():
    """θ_α = θ_0 + α (θ_T − θ_0): θ_0 = [0, 2], θ_T = [4, -2], α = 0.25 -> [1, 1]; integer tensors keep θ_T."""
    initial = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor([1])}
    final = {"w": torch.tensor([4.0, -2.0]), "n": torch.tensor([7])}
    assert torch.equal(chord(initial, final, 0.25)["w"], torch.tensor([1.0, 1.0]))
    assert torch.equal(chord(initial, final, 0.0)["w"], initial["w"])
    assert torch.equal(chord(initial, final, 1.0)["w"], final["w"]) and chord(initial, final, 0.5)["n"].item() == 7


def test_search_chord_keeps_the_final_weights_or_bisects_to_the_largest_passing_alpha(monkeypatch):
    """With guards that pass for α <= 0.3: 1 fails, then 0.5 fails, 0.25 passes, 0.375 fails, 0.3125 fails -> 0.25."""
    def guards(family, weights, label, *args):
        return {**label, "passed": weights["w"].item() <= 0.3}

    monkeypatch.setattr(guard_rollback, "check", guards)
    zero, one = {"w": torch.tensor(0.0)}, {"w": torch.tensor(1.0)}
    alpha, checked = guard_rollback.search_chord(None, zero, one, None, GuardPlan(bisections=4), 0, {})
    assert alpha == 0.25 and [c["alpha"] for c in checked] == [1.0, 0.5, 0.25, 0.375, 0.3125]
    alpha, checked = guard_rollback.search_chord(None, zero, {"w": torch.tensor(0.2)}, None, GuardPlan(), 0, {})
    assert alpha == 1.0 and len(checked) == 1  # the final weights pass: nothing else is drawn
    alpha, _ = guard_rollback.search_chord(None, {"w": torch.tensor(0.5)}, one, None, GuardPlan(bisections=3), 0, {})
    assert alpha == 0.0  # nothing on the chord passes: the start
    with pytest.raises(ValueError, match="guard search 'newest'"):
        DemoSettings(guard_search="newest")  # refused when the settings are made, before anything runs


@pytest.mark.slow
def test_the_chord_guard_rolls_a_destroyed_run_back_to_the_base_and_keeps_the_final_weights(tmp_path):
    out = tmp_path / "demo"
    metrics = run_demo(DemoSettings(out=out, budget=16, groups_per_prompt=1, guard_checks=2, guard_search="chord",
                                    overrides=("train.max_steps=4", "train.batch_size=4", "optim.lr=1e-2")))
    guarded = metrics["guard_rollback"]
    assert guarded["alpha"] == 0.0 and guarded["chosen_step"] == 0 and guarded["rolled_back"]
    assert [c["alpha"] for c in guarded["checked"]] == [1.0, 0.5, 0.25, 0.125, 0.0625]
    base, exported = _unet(Path(resolve_pretrained("toy")) / "unet"), _unet(out / "model" / "unet")
    assert all(torch.equal(exported[k].float(), base[k].float()) for k in base)  # the chord's start is the base
    final = load_file(str(out / "model" / "checkpoints" / "checkpoint-00000004" / "weights.safetensors"))
    assert any(not torch.equal(final[k], exported[k]) for k in final)
    assert "rolled back to step 0" in metrics["guard_rollback"]["line"]
