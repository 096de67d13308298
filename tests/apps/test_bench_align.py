"""`dkto bench align` end to end on a tiny budget: every method trains (DPO needs same-prompt pairs: 4 images per training prompt), the table and results file are written."""
import json

import pytest

from diffusion_kto.apps.bench_align import METHODS, AlignSettings, run_bench_align


@pytest.mark.slow
def test_bench_align_runs_every_method_and_writes_the_table(tmp_path):
    settings = AlignSettings(out=tmp_path, seeds=2, budget=180, steps=2, groups_per_prompt=1, lr_grid=(4e-5,))
    summary = run_bench_align(settings)
    assert set(summary["chosen_lr"]) == set(METHODS)
    text = (tmp_path / "align.md").read_text()
    assert "Win rate of KTO over each method" in text and "commit" in text
    assert all(name in text for name in ("sft", "csft", "dpo", "kto-amortized", "kto-mismatched vs kto-amortized"))
    assert json.loads((tmp_path / "feedback" / "stats.json").read_text())["images"] == 180
    base = [w for w in summary["winrates"] if w["b"] == "base" and w["metric"] == "preference"][0]
    assert base["n"] == 2 * 9  # 2 training seeds x 9 held-out prompts x 1 seed group, each with its own base images


def test_every_training_seed_is_evaluated_on_image_seeds_of_its_own():
    from diffusion_kto.apps.bench_align import eval_seeds
    from diffusion_kto.apps.demo import DemoSettings

    demo = DemoSettings(groups_per_prompt=2)
    assert [eval_seeds(demo, s).seed for s in range(3)] == [0, 1, 2]
    assert eval_seeds(demo, 1).groups_per_prompt == 2 and demo.seed == 0


def test_the_amortized_reference_point_is_compared_with_the_every_step_mismatched_one():
    import numpy as np

    from diffusion_kto.apps.bench_align import align_comparisons

    rng = np.random.default_rng(0)
    scores = {m: {"preference": rng.random((6, 5))} for m in ("kto", "base", "kto-mismatched", "kto-amortized")}
    pairs = [(c.a, c.b) for c in align_comparisons(scores)]
    assert pairs == [("kto", "base"), ("kto", "kto-mismatched"), ("kto", "kto-amortized"),
                     ("kto-mismatched", "kto-amortized")]


@pytest.mark.parametrize("quick, seeds, expected", [(False, None, 3), (True, None, 1), (True, 3, 3), (False, 5, 5)])
def test_quick_mode_keeps_an_explicit_seed_count(quick, seeds, expected):
    settings = AlignSettings(quick=quick, seeds=seeds)
    assert settings.seeds == expected
    assert settings.lr_grid == ((4e-5,) if quick else (2e-5, 4e-5, 8e-5))


@pytest.mark.parametrize("quick, steps, expected", [(False, None, 200), (True, None, 80), (False, 7, 7), (True, 7, 7)])
def test_training_steps_are_the_benchmarks_own_not_the_demo_configs(quick, steps, expected):
    assert AlignSettings(quick=quick, steps=steps).steps == expected


def test_a_restarted_benchmark_reuses_a_finished_run_only_when_its_config_is_the_same(tmp_path):
    from diffusion_kto.apps import bench_step as bench
    from diffusion_kto.config import ConfigError
    from diffusion_kto.apps.bench_align import train_method

    feedback = bench.write_feedback(tmp_path / "data", 32, n=8)
    out = train_method(AlignSettings(out=tmp_path, steps=1), feedback, "sft", 4e-5, 0)
    done = (out / "train_done.json").stat().st_mtime_ns
    assert train_method(AlignSettings(out=tmp_path, steps=1), feedback, "sft", 4e-5, 0) == out
    assert (out / "train_done.json").stat().st_mtime_ns == done  # reused, not retrained
    with pytest.raises(ConfigError, match="another config"):
        train_method(AlignSettings(out=tmp_path, steps=2), feedback, "sft", 4e-5, 0)


def test_the_base_model_is_sampled_with_the_plain_prompt():
    """bench align evaluates the base under the name "base", which names no method (a KeyError stopped every run)."""
    from diffusion_kto.apps.bench_align import _prompt_for

    assert _prompt_for("base", "a red circle") == "a red circle"
    assert _prompt_for("csft", "a red circle") == "a red circle, good image"


def test_a_subset_of_methods_keeps_kto_and_the_table_order_and_refuses_unknown_names():
    from diffusion_kto.config import ConfigError

    assert AlignSettings(methods=("dpo", "kto_paired")).methods == ("kto", "dpo", "kto_paired")
    with pytest.raises(ConfigError, match="unknown ktop; choose from kto, sft"):
        AlignSettings(methods=("ktop",))


def test_each_objective_beyond_the_paper_is_compared_with_dpo():
    import numpy as np

    from diffusion_kto.apps.bench_align import align_comparisons

    rng = np.random.default_rng(0)
    scores = {m: {"preference": rng.random((6, 5))} for m in ("kto", "base", "dpo", "kto_paired", "nft")}
    pairs = [(c.a, c.b) for c in align_comparisons(scores)]
    assert pairs[-2:] == [("kto_paired", "dpo"), ("nft", "dpo")] and ("kto", "kto_paired") in pairs
