"""The 2-D utility experiment (paper §6): runs end to end on a tiny recipe, writes its report, and moves samples."""
import json

import pytest

from diffusion_kto.apps.utility2d import Recipe2D, beta_from_sft, blowup_step, finetune, pretrain, run, sample, summarise

TINY = dict(pretrain_steps=150, finetune_steps=60, samples=300, timesteps=20, batch_size=128, trace_every=20)


def test_tiny_recipe_runs_and_writes_outputs(tmp_path):
    results = run(tmp_path, Recipe2D(**TINY, beta_grid=(30.0, 100.0)), command="test")
    assert (tmp_path / "utility2d.png").is_file()
    saved = json.loads((tmp_path / "utility2d.json").read_text())
    assert set(saved) >= {"pretrained", "kt", "loss_averse", "risk_seeking", "sft", "_beta", "_grid"}
    assert set(saved["_grid"]) == {"30.0", "100.0"}
    assert results["sft"]["dist_to_liked"] < results["pretrained"]["dist_to_liked"]
    md = (tmp_path / "utility2d.md").read_text()
    assert "| sample mean |" in md and "| kt |" in md and "Beta grid" in md and "`test`" in md


def test_kt_moves_the_mean_towards_the_liked_mean():
    recipe = Recipe2D(**{**TINY, "finetune_steps": 150})
    base = pretrain(recipe)
    before = summarise(sample(base, recipe))
    policy, trace = finetune(base, "kt", recipe, beta=100.0)
    after = summarise(sample(policy, recipe))
    assert after["dist_to_liked"] < before["dist_to_liked"] - 0.03
    assert len(trace) == 9 and trace[0]["median_abs_g"] == 0.0  # policy == reference at step 0


def test_finetune_wants_beta_exactly_for_the_utilities():
    recipe = Recipe2D(**TINY)
    with pytest.raises(ValueError):
        finetune(None, "kt", recipe)
    with pytest.raises(ValueError):
        finetune(None, "sft", recipe, beta=100.0)


def test_beta_from_sft_takes_the_grid_value_nearest_one_over_g():
    trace = [{"median_abs_g": 1.0}] * 3 + [{"median_abs_g": 0.011}] * 3
    assert beta_from_sft(trace, (10.0, 30.0, 100.0, 300.0)) == 100.0
    assert beta_from_sft([{"median_abs_g": 0.02}], (10.0, 30.0, 100.0)) == 30.0


def test_blowup_step_is_the_first_large_or_non_finite_error_ratio():
    rows = [{"step": 0, "err_ratio": 1.0}, {"step": 50, "err_ratio": 12.0}, {"step": 100, "err_ratio": float("nan")}]
    assert blowup_step(rows) == 50
    assert blowup_step(rows[:1]) is None
    assert blowup_step([rows[0], rows[2]]) == 100


def test_summarise_keeps_finite_points_and_reports_shares():
    import numpy as np

    pts = np.array([[0.3, 0.8], [0.3, 0.8], [np.nan, 0.0], [50.0, 50.0]])
    row = summarise(pts)
    assert row["finite_share"] == 0.75 and row["in_window_share"] == 0.5
    assert abs(row["spread"] - np.sqrt(np.array([[0.3, 0.8], [0.3, 0.8], [50.0, 50.0]]).var(0).mean())) < 1e-9
    assert summarise(np.full((2, 2), np.nan))["mean_x"] is None
