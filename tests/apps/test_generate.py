"""`dkto generate`: a labeling queue of the shipped toy model's images, resumed after an interruption, refused with
other settings."""
import json

import numpy as np
import pytest
from PIL import Image

from test_cli import dkto

from diffusion_kto.apps.generate import GenerateSettings, generate_queue
from diffusion_kto.apps.label.store import read_queue
from diffusion_kto.sampling import load_pipeline


def test_queue_resumes_after_a_torn_write_with_the_same_images(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square on black\n")
    out, settings = tmp_path / "q", GenerateSettings(prompts=str(prompts), per_prompt=2, seed=5, batch_size=2, steps=4)
    pipe = load_pipeline("toy", device="cpu")
    generate_queue(out, settings, pipe=pipe, progress=False)
    rows = read_queue(out)
    assert [(r["id"], r["prompt"], r["seed"], r["model"]) for r in rows] == [
        ("000000", "a red circle", 5, "toy"), ("000001", "a red circle", 6, "toy"),
        ("000002", "a blue square on black", 7, "toy"), ("000003", "a blue square on black", 8, "toy")]
    first = {r["id"]: np.asarray(Image.open(out / r["image"])) for r in rows}
    for kept in (2, 1):  # killed after its first batch (a torn line left), or with a row of a batch only
        lines = (out / "queue.jsonl").read_text().splitlines()
        (out / "queue.jsonl").write_text("".join(line + "\n" for line in lines[:kept]) + lines[kept][:10])
        for r in rows[kept:]:
            (out / r["image"]).unlink()
        generate_queue(out, settings, pipe=pipe, progress=False)
        again = read_queue(out)
        assert again == rows  # images are redrawn from the last whole batch, in the same batches as before
        assert all(np.array_equal(first[r["id"]], np.asarray(Image.open(out / r["image"]))) for r in again)
    with pytest.raises(FileExistsError, match="per_prompt differ"):
        generate_queue(out, GenerateSettings(prompts=str(prompts), per_prompt=3, seed=5, batch_size=2, steps=4))


def test_cli_writes_a_queue_the_label_server_reads(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a green triangle\n")
    proc = dkto("generate", "--prompts", str(prompts), "--per-prompt", "2", "--steps", "2", "--out", str(tmp_path / "q"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dkto label serve" in proc.stdout
    settings = json.loads((tmp_path / "q" / "generate.json").read_text())
    assert settings["prompt_list"] == ["a green triangle"] and settings["sampling"]["steps"] == 2
    assert len(read_queue(tmp_path / "q")) == 2
    other = dkto("generate", "--prompts", str(prompts), "--out", str(tmp_path))  # a non-queue, non-empty folder
    assert other.returncode == 2 and "not a dkto generate queue" in other.stderr
