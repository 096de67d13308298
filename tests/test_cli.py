"""The `dkto` command line, run as a real subprocess; exports load into diffusers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny import tiny_overrides


def dkto(*args, cwd=None):
    """Run `python -m diffusion_kto.cli ...` offline; returns the CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "diffusion_kto.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def _sample(pipe):
    return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                height=16, width=16, output_type="np").images


def test_train_lora_then_load_lora_weights_changes_output(tiny_sd, feedback, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    proc = dkto("train", *tiny_overrides(tiny_sd, feedback, out, **{"lora.rank": 4, "optim.lr": 5e-2}))
    assert proc.returncode == 0, proc.stderr
    assert "exported" in proc.stdout
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    before = _sample(pipe)
    pipe.load_lora_weights(str(out))
    after = _sample(pipe)
    assert np.abs(before - after).max() > 1e-4
    resolved = (out / "config.yaml").read_text()
    assert "rank: 4" in resolved


def test_full_export_loads_as_unet(tiny_sd, feedback, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "run"
    assert dkto("train", *tiny_overrides(tiny_sd, feedback, out, **{"train.max_steps": 1})).returncode == 0
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, unet=unet, safety_checker=None)
    assert _sample(pipe).shape == (1, 16, 16, 3)


def test_sample_command(tiny_sd, feedback, tmp_path):
    out = tmp_path / "run"
    assert dkto("train", *tiny_overrides(tiny_sd, feedback, out, **{"lora.rank": 2, "train.max_steps": 1})).returncode == 0
    proc = dkto("sample", "--model", str(tiny_sd), "--lora", str(out), "--prompt", "a red circle",
                "--prompt", "a blue square", "--num", "2", "--steps", "2", "--resolution", "16", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "s").glob("*.png"))) == 4
    again = dkto("sample", "--model", str(tiny_sd), "--prompt", "a red circle", "--steps", "1", "--out", str(tmp_path / "s"))
    assert again.returncode != 0 and "not empty" in again.stderr


@pytest.mark.parametrize("case, message", [
    ("missing_image", "img3.png"),
    ("bad_label", "maybe"),
    ("unreadable", "img2.png"),
    ("empty", "empty"),
    ("no_disliked", "disliked"),
])
def test_bad_data_stops_before_training_and_names_the_row(tiny_sd, feedback, tmp_path, case, message, capsys):
    """In-process (cli.main) for speed; the subprocess path is covered by the tests above."""
    from diffusion_kto.cli import main

    rows = [json.loads(line) for line in feedback.read_text().splitlines()]
    if case == "missing_image":
        (feedback.parent / "img3.png").unlink()
    elif case == "bad_label":
        rows[5]["label"] = "maybe"
    elif case == "unreadable":
        (feedback.parent / "img2.png").write_bytes(b"not a png")
    elif case == "empty":
        rows = []
    elif case == "no_disliked":
        rows = [{**r, "label": True} for r in rows]
    feedback.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = main(["train", *tiny_overrides(tiny_sd, feedback, out)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert not out.exists()


def test_on_bad_row_skip_shows_the_counts(tiny_sd, tmp_path):
    from tiny import write_bad_feedback

    data, out = write_bad_feedback(tmp_path / "d"), tmp_path / "run"
    proc = dkto("train", *tiny_overrides(tiny_sd, data, out, **{"train.max_steps": 2, "data.on_bad_row": "skip"}))
    assert proc.returncode == 0, proc.stderr
    counts = "skipped 4 of 12 rows: 1 missing image, 1 unreadable image, 1 unknown label, 1 empty prompt"
    assert f"data: 8 rows (4 liked, 4 disliked); {counts}" in proc.stdout
    assert f"skipped rows are listed in {out / 'skipped_rows.jsonl'}" in proc.stdout
    assert counts in proc.stderr and f"{data}:2: image" in proc.stderr  # the log names the first rows
    assert len((out / "skipped_rows.jsonl").read_text().splitlines()) == 4


def test_check_config_data_previews_bad_rows(tmp_path, capsys):
    from tiny import write_bad_feedback

    from diffusion_kto.cli import main

    data = write_bad_feedback(tmp_path / "d")
    assert main(["check-config", "--data", f"data.path={data}", "data.on_bad_row=skip"]) == 0
    assert "# data: 8 rows (4 liked, 4 disliked); skipped 4 of 12 rows" in capsys.readouterr().out
    assert main(["check-config", "--data", f"data.path={data}"]) == 2
    assert "4 bad rows of 12" in capsys.readouterr().err


def test_unknown_key_is_a_clear_error(tmp_path):
    proc = dkto("train", "loss.bta=3")
    assert proc.returncode == 2 and "unknown config key loss.bta" in proc.stderr


def test_check_config_prints_resolved_values():
    proc = dkto("check-config", "loss.beta=123")
    assert proc.returncode == 0 and "beta: 123.0" in proc.stdout


def test_8bit_adam_on_a_cpu_is_one_clear_line(tiny_sd, feedback, tmp_path):
    """bitsandbytes' 8-bit AdamW needs CUDA: on a CPU the run stops before training with one line naming the key."""
    proc = dkto("train", *tiny_overrides(tiny_sd, feedback, tmp_path / "run", **{"optim.use_8bit_adam": "true"}))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("dkto train: error: optim.use_8bit_adam=true") and "CUDA" in lines[-1]
    assert "Traceback" not in proc.stderr and "use_8bit_adam=false" in lines[-1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
