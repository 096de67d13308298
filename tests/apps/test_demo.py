"""`dkto demo` end to end, seconds long: tiny budget, few steps, one seed group (diffusion_kto.apps.demo)."""
import json

import numpy as np
import pytest

from test_cli import dkto

from diffusion_kto.apps import demo
from diffusion_kto.apps.demo import DemoSettings, demo_judge, run_demo
from diffusion_kto.toy import judges, world


def test_demo_smoke_run_with_a_users_judge_writes_feedback_report_and_metrics(tmp_path):
    judge = tmp_path / "my_judge.py"
    judge.write_text("import numpy as np\n\ndef brightness(images, prompts):\n"
                     "    return [float(np.asarray(im, dtype=float).mean() / 255) for im in images]\n")
    out = tmp_path / "demo"
    proc = dkto("demo", "--out", str(out), "--judge", f"{judge}:brightness", "--budget", "16", "--groups", "1",
                "--threshold", "0.5", "--guard-checks", "1", "train.max_steps=2", "train.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "aligned beats base in" in proc.stdout
    rows = [json.loads(line) for line in (out / "feedback" / "feedback.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all((out / "feedback" / r["image"]).is_file() for r in rows)
    assert all(r["label"] == (r["score"] >= 0.5) for r in rows)  # labels come from the user's judge
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["judge"] == f"{judge}:brightness" and metrics["train"]["steps"] == 2
    assert metrics["win_rate"]["n"] == metrics["settings"]["held_out_prompts"]  # one seed group per prompt
    assert set(metrics["stage_seconds"]) == {"load base model", "collect feedback", "train (Diffusion-KTO)", "guard",
                                            "evaluate"}
    for name in ("report.md", "report.html", "grid_base_vs_aligned__same_prompts_and_seeds.png"):
        assert (out / name).is_file()
    card = (out / "model" / "README.md").read_text()  # the trained model's card, with the demo's results
    assert card.startswith("---\n") and "### dkto demo" in card and "win rate over the base" in card
    assert "16 rows:" in card and "![base vs aligned](demo-grid.png)" in card and (out / "model" / "demo-grid.png").is_file()


def test_demo_with_lora_evaluates_the_adapters(tmp_path, monkeypatch):
    """The aligned model of the evaluation is the base with the trained adapters on top: it draws other images than
    the base for the same held-out prompts and seeds (one step at a large learning rate, so that they must)."""
    evaluated, evaluate = {}, demo.evaluate

    def spy(base, aligned, judge, settings):
        results = evaluate(base, aligned, judge, settings)
        evaluated.update(results, adapters=aligned.get_active_adapters())
        return results

    monkeypatch.setattr(demo, "evaluate", spy)
    metrics = run_demo(DemoSettings(out=tmp_path / "demo", budget=16, groups_per_prompt=1, guard_checks=0,
                                    overrides=("lora.rank=2", "train.max_steps=1", "train.batch_size=4",
                                               "optim.lr=1e-2")))  # no rollback: the wrecked adapters are evaluated
    assert (tmp_path / "demo" / "model" / "pytorch_lora_weights.safetensors").is_file()
    assert 0.0 <= metrics["win_rate"]["rate"] <= 1.0 and metrics["aligned"]["diversity"] > 0
    base, aligned = evaluated["base"], evaluated["aligned"]
    assert evaluated["adapters"], "the aligned pipeline has no LoRA adapters loaded"
    assert base["prompts"] == aligned["prompts"] and np.array_equal(base["seeds"], aligned["seeds"])
    changed = [not np.array_equal(np.asarray(b), np.asarray(a)) for b, a in zip(base["images"], aligned["images"])]
    assert len(changed) == len(world.eval_prompts()) * 5 and all(changed)


def test_demo_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("earlier results")
    with pytest.raises(FileExistsError, match="not empty"):
        run_demo(DemoSettings(out=tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "earlier results"


def test_bare_judge_names_are_the_shapes_worlds_and_other_specs_pass_through(tmp_path):
    assert demo_judge("preference").judge is judges.preference
    assert demo_judge(" fidelity ").judge is judges.fidelity
    assert demo_judge(judges.aesthetic).judge is judges.aesthetic
    assert demo_judge("toy:clean").judge is judges.clean_score
    path = tmp_path / "my_judge.py"
    path.write_text("def half(images, prompts):\n    return [0.5] * len(images)\n")
    assert demo_judge(f"{path}:half")([None, None], ["a", "b"]).tolist() == [0.5, 0.5]  # checked: a float array
    with pytest.raises(ValueError, match="'no_such_judge': not a registered judge"):
        demo_judge("no_such_judge")


def test_demo_on_the_flow_toy_uses_its_own_config_and_exports_the_transformer(tmp_path):
    from diffusion_kto.toy import flow_weights_dir

    if not (flow_weights_dir() / "model_index.json").exists():
        pytest.skip("toy-flow weights not shipped in this checkout")
    settings = DemoSettings(out=tmp_path / "demo", model="toy-flow", budget=8, groups_per_prompt=1, guard_checks=1,
                            overrides=("train.max_steps=1", "train.batch_size=4"))
    assert settings.config.name == "toy-flow-kto.yaml" and settings.sampling == demo.FLOW_SAMPLING
    metrics = run_demo(settings)
    assert (tmp_path / "demo" / "model" / "transformer" / "config.json").is_file()
    assert metrics["settings"]["config"].endswith("toy-flow-kto.yaml") and metrics["train"]["steps"] == 1
    assert (tmp_path / "demo" / "report.html").is_file()
    assert metrics["guard_rollback"]["checked"][0]["alpha"] == 1.0  # the guards check the flow family's weights too
