"""`dkto eval`: base vs a few-step LoRA, paired images, the report files, and resuming without regenerating."""
import contextlib
import io
import json

import numpy as np
import pytest

from diffusion_kto.cli import main
from diffusion_kto.evaluation import report
from diffusion_kto.evaluation import run as eval_run
from diffusion_kto.evaluation.run import EvalError, ModelSpec, seeds_for


def _toy_ready() -> bool:
    """Whether the shipped toy pipeline is there (it is pretrained separately)."""
    from diffusion_kto.toy import weights_dir

    return (weights_dir() / "model_index.json").is_file()


@pytest.fixture(scope="module")
def base(tiny_sd):
    """(base spec, resolution): the shipped toy model when present, else the tiny random pipeline."""
    return ("toy", 32) if _toy_ready() else (str(tiny_sd), 16)


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    """A LoRA from a 2-step `dkto train` on 2 prompts x 2 images (1 liked, 1 disliked each)."""
    from PIL import Image

    model, res = base
    root = tmp_path_factory.mktemp("lora")
    rows = []
    for i, (prompt, colour) in enumerate([("a red circle", (220, 40, 40)), ("a blue square", (40, 70, 220))] * 2):
        Image.new("RGB", (res, res), colour if i < 2 else (128, 128, 128)).save(root / f"img{i}.png")
        rows.append(json.dumps({"image": f"img{i}.png", "prompt": prompt, "label": i < 2}))
    (root / "feedback.jsonl").write_text("\n".join(rows) + "\n")
    out = root / "run"
    overrides = {"model.pretrained": model, "data.path": root / "feedback.jsonl", "data.resolution": res,
                 "train.output_dir": out, "train.max_steps": 2, "train.batch_size": 4, "train.checkpoint_every": 0,
                 "log.every": 1, "optim.lr": 5e-2, "optim.warmup_steps": 0, "loss.beta": 100.0,
                 "data.caption_dropout": 0.0, "lora.rank": 4}
    assert main(["train", *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    return out


def _args(base, lora_run, tiny_clip, prompts_file, out, *extra):
    model, res = base
    return ["eval", "--models", f"aligned={model}+lora:{lora_run}", f"base={model}", "--prompts", str(prompts_file),
            "--metrics", f"toy:preference,clip={tiny_clip}", "--images-per-prompt", "2", "--steps", "2",
            "--resolution", str(res), "--batch-size", "4", "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def evaluated(base, lora_run, tiny_clip, tmp_path_factory):
    """One `dkto eval` run (in-process: test_cli covers the console entry point); returns (args, out, stdout)."""
    root = tmp_path_factory.mktemp("eval")
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("a red circle\na blue square\n")
    out = root / "out"
    args = _args(base, lora_run, tiny_clip, prompts_file, out)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(args)
    assert code == 0, buffer.getvalue()[-3000:]
    return args, out, buffer.getvalue()


def test_report_files_and_results(evaluated):
    _, out, stdout = evaluated
    for name in ("results.json", "report.md", "report.html", "prompts.json",
                 "grid_same_prompt_and_seed_across_models.png"):
        assert (out / name).is_file(), name
    hists = report.matplotlib_available()  # the [eval] extra; without it the report says so instead
    assert (out / "hist_toy_preference.png").is_file() == hists and (out / "hist_clip.png").is_file() == hists
    assert "aligned vs base" in stdout and "report.html" in stdout
    results = json.loads((out / "results.json").read_text())
    assert {(w["a"], w["b"], w["metric"]) for w in results["winrates"]} == {
        ("aligned", "base", "toy:preference"), ("aligned", "base", "clip")}
    assert all(w["n"] == 2 and w["ci_n"] == 2 for w in results["winrates"])  # CI counts prompts by default
    assert set(results["means"]) == {"aligned", "base"}
    assert np.asarray(results["scores"]["base"]["clip"]).shape == (2, 2)
    assert results["protocol"]["steps"] == 2 and results["protocol"]["images_per_prompt"] == 2
    assert results["models"]["aligned"]["sampler"] == "DDIMScheduler"
    assert results["models"]["aligned"]["generated"] == 4
    md = (out / "report.md").read_text()
    assert "| aligned vs base |" in md and "ties count half" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 + 2 * hists  # 2 grids (+ 2 histograms), inline
    assert hists or "matplotlib is not installed" in md


def test_images_are_paired_by_prompt_index_and_seed(evaluated):
    _, out, _ = evaluated
    seeds = seeds_for(2, 2, 0)
    for model in ("aligned", "base"):
        names = sorted(p.name for p in (out / "images" / model).glob("*.png"))
        assert names == sorted(f"p{i:05d}_s{s}.png" for i in range(2) for s in seeds[i])
        record = json.loads((out / "images" / model / "generation.json").read_text())
        assert record["steps"] == 2 and record["guidance"] is not None and record["sampler"] == "DDIMScheduler"
    assert json.loads((out / "images" / "aligned" / "generation.json").read_text())["adapter_fingerprint"]


def test_resume_reuses_images_and_scores(evaluated, monkeypatch, capsys):
    args, out, _ = evaluated
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}

    def no_pipeline(*a, **k):
        raise AssertionError("a resumed run must not load a pipeline")

    monkeypatch.setattr("diffusion_kto.sampling.load_pipeline", no_pipeline)
    monkeypatch.setattr(eval_run.Metric, "load", lambda self, device=None: (_ for _ in ()).throw(
        AssertionError("cached scores must be reused")))
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "aligned: generated 0 images, reused 4" in printed
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before
    results = json.loads((out / "results.json").read_text())
    assert results["models"]["base"]["reused"] == 4


def test_other_settings_in_the_same_folder_stop_with_a_clear_error(evaluated, capsys):
    args, _, _ = evaluated
    changed = [("3" if a == "2" and args[i - 1] == "--steps" else a) for i, a in enumerate(args)]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "steps" in err


def test_model_spec_syntax(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (tmp_path / "full" / "unet").mkdir(parents=True)
    (tmp_path / "full" / "unet" / "config.json").write_text("{}")
    assert ModelSpec.parse("base=toy") == ModelSpec("base", "toy")
    assert ModelSpec.parse(f"kto=toy+lora:{tmp_path / 'lora'}").lora == str(tmp_path / "lora")
    assert ModelSpec.parse(f"kto=sd15+unet:{tmp_path / 'full'}").unet == str(tmp_path / "full")
    assert ModelSpec.parse(f"kto=toy+{tmp_path / 'lora'}").lora == str(tmp_path / "lora")  # detected
    assert ModelSpec.parse(f"toy+{tmp_path / 'full'}").name == "full"  # name from the adapter folder
    assert ModelSpec.parse("runwayml/stable-diffusion-v1-5").name == "stable-diffusion-v1-5"
    with pytest.raises(EvalError, match="neither"):
        ModelSpec.parse(f"x=toy+{tmp_path}")
    with pytest.raises(EvalError, match="plain word"):
        ModelSpec.parse("a/b=toy")
    with pytest.raises(EvalError, match="no pytorch_lora_weights"):
        ModelSpec.parse(f"x=toy+lora:{tmp_path / 'full'}").validate()


def test_seeds_are_shared_and_stable_when_n_grows():
    small, big = seeds_for(3, 2, 7), seeds_for(4, 5, 7)
    assert np.array_equal(big[:3, :2], small)
    assert len(np.unique(big)) == big.size


def test_bad_inputs_exit_2_before_any_work(tmp_path, capsys):
    code = main(["eval", "--models", "a=toy", "a=toy", "--out", str(tmp_path / "o")])
    assert code == 2 and "unique" in capsys.readouterr().err
    code = main(["eval", "--models", "a=toy", "--metrics", "nope", "--out", str(tmp_path / "o")])
    assert code == 2 and "unknown metric 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_category_means_follow_the_prompt_categories():
    from diffusion_kto.evaluation.prompts import PromptSet

    ps = PromptSet("p", ["a", "b", "c"], "test", ["photo", "anime", "photo"])
    scores = {"m": {"s": np.array([[1.0, 3.0], [10.0, 10.0], [5.0, 7.0]])}}
    assert eval_run.category_means(ps, scores) == {"m · photo": {"s": 4.0}, "m · anime": {"s": 10.0}}
    assert eval_run.category_means(PromptSet("p", ["a"], "test"), {"m": {"s": np.ones((1, 2))}}) == {}


def test_the_evaluated_runs_card_gets_the_results(evaluated, lora_run):
    """`dkto eval` adds its win rates and mean scores to the model card of every run it evaluates (the LoRA's)."""
    _, out, stdout = evaluated
    card = (lora_run / "README.md").read_text()
    assert "### dkto eval (prompts)" in card and "aligned vs base" in card
    assert "No evaluation yet" not in card and f"added the results to {lora_run / 'README.md'}" in stdout
    assert card.startswith("---\n")  # the front matter is kept
