"""Exact resume: every process's python, numpy, torch and CUDA random states and the metrics of the micro-steps since
the last log row are checkpointed, so a resumed run logs and trains what an uninterrupted one does."""
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny import logged_metrics, tiny_overrides
from diffusion_kto.config import load_config
from diffusion_kto.train import DiffusionKTOTrainer, checkpoint, rng


def _run(tiny_sd, feedback, out, **extra):
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, out, **extra))
    trainer = DiffusionKTOTrainer(cfg)
    trainer.train()
    return trainer


def test_resume_with_dropout_logs_what_the_uninterrupted_run_logs(tiny_sd, feedback, tmp_path):
    """LoRA dropout draws from torch's generator at every step; the checkpoint (step 3) falls between two log rows
    (every 2 steps). 6 straight steps == 3 steps + resume + 3 steps: the same weights and the same rows at 2, 4, 6."""
    common = {"lora.rank": 4, "lora.dropout": 0.25, "train.checkpoint_every": 3, "log.every": 2}
    _run(tiny_sd, feedback, tmp_path / "a", **common, **{"train.max_steps": 6})
    _run(tiny_sd, feedback, tmp_path / "b", **common, **{"train.max_steps": 3})
    _run(tiny_sd, feedback, tmp_path / "b", **common, **{"train.max_steps": 6, "train.resume": "latest"})
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = logged_metrics(tmp_path / "a" / "metrics.jsonl")
    lb = [row for row in logged_metrics(tmp_path / "b" / "metrics.jsonl") if row["step"] % 2 == 0]
    assert [row["step"] for row in la] == [2, 4, 6] and la == lb  # b's extra row at its last step 3 aside


def test_resume_restores_python_numpy_and_torch_random_states(tiny_sd, feedback, tmp_path, monkeypatch):
    """The states at the checkpoint are the states the resumed run's next step starts from."""
    common = {"lora.rank": 2, "train.checkpoint_every": 2}
    saved, real_save = [], checkpoint.save_checkpoint

    def save(*args, **kwargs):
        saved.append((random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    _run(tiny_sd, feedback, tmp_path / "b", **common, **{"train.max_steps": 2})
    random.random(), np.random.rand(), torch.rand(1)  # move every generator on
    resumed = DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "b", **common, **{
        "train.max_steps": 3, "train.resume": "latest"})))
    seen, real_step = [], DiffusionKTOTrainer.step

    def step(self, batch):
        seen.append((random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()))
        return real_step(self, batch)

    monkeypatch.setattr(DiffusionKTOTrainer, "step", step)
    resumed.train()
    (py, np_keys, pt) = saved[0]
    assert seen[0][0] == py and np.array_equal(seen[0][1], np_keys) and torch.equal(seen[0][2], pt)


def test_random_states_survive_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # numpy caches a second gaussian: has_gauss = 1
    state = rng.capture()
    torch.save(state, tmp_path / "s.pt")
    expected = (random.random(), np.random.randn(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rng.restore(torch.load(tmp_path / "s.pt", weights_only=True))
    again = (random.random(), np.random.randn(), torch.rand(2))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_a_checkpoint_without_the_new_states_still_resumes(tiny_sd, feedback, tmp_path):
    """Checkpoints written before the random states of every process were kept hold torch's CPU state alone."""
    import json

    common = {"lora.rank": 2, "train.checkpoint_every": 2}
    _run(tiny_sd, feedback, tmp_path / "b", **common, **{"train.max_steps": 2})
    (ckpt,) = checkpoint.list_checkpoints(tmp_path / "b" / "checkpoints")
    sched = torch.load(ckpt / "scheduler.pt", weights_only=True)
    torch.save({"lr_scheduler": sched["lr_scheduler"], "torch_rng": sched["torch_rng"]}, ckpt / "scheduler.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["scheduler.pt"] = checkpoint._sha256(ckpt / "scheduler.pt")
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    resumed = _run(tiny_sd, feedback, tmp_path / "b", **common, **{"train.max_steps": 3, "train.resume": "latest"})
    assert resumed.global_step == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_random_states_round_trip(tmp_path):
    torch.cuda.manual_seed_all(5)
    torch.rand(1, device="cuda")  # CUDA in use: its state is captured
    state = rng.capture()
    torch.save(state, tmp_path / "s.pt")
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed_all(7)
    rng.restore(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(torch.rand(3, device="cuda"), expected)


class _Payload:
    """Unpickling this object (without weights_only) would create a file: the proof that a load ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt"])
def test_pickled_objects_in_optimizer_or_scheduler_state_are_refused(tiny_sd, feedback, tmp_path, name):
    """A checkpoint whose optimizer or scheduler file holds a pickled object (hashes updated, so it looks complete) is
    refused with one line naming the file; the object's code never runs."""
    import json
    import os
    import subprocess
    import sys

    common = {"lora.rank": 2, "train.checkpoint_every": 2}
    _run(tiny_sd, feedback, tmp_path / "run", **common, **{"train.max_steps": 2})
    (ckpt,) = checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")
    marker = tmp_path / "code-ran"
    state = torch.load(ckpt / name, weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, ckpt / name)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = checkpoint._sha256(ckpt / name)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    args = tiny_overrides(tiny_sd, feedback, tmp_path / "run", **common, **{"train.max_steps": 3,
                                                                            "train.resume": "latest"})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "diffusion_kto.cli", "train", *args], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dkto train: error: train.resume: ") and f"{name} holds pickled" in last
    assert not marker.exists()


def test_resume_after_a_skipped_window_continues_at_the_next_micro_step(tiny_sd, feedback, tmp_path, monkeypatch):
    """A skipped window uses micro-steps without an optimizer step, so the resumed loader starts at the checkpoint's
    micro-step, not at step x grad_accum: 4 straight steps == 2 + resume + 2, with micro-step 1 non-finite."""
    import json

    from diffusion_kto import losses

    real_loss, real_step, nan = losses.kto_loss, DiffusionKTOTrainer.step, {"on": False}

    def kto_loss(*a, **k):
        out = real_loss(*a, **k)
        return out._replace(losses=out.losses * float("nan")) if nan["on"] else out

    def step(self, batch):
        nan["on"] = self.micro_step == 1
        return real_step(self, batch)

    monkeypatch.setattr(losses, "kto_loss", kto_loss)
    monkeypatch.setattr(DiffusionKTOTrainer, "step", step)
    common = {"lora.rank": 2, "train.checkpoint_every": 2}
    _run(tiny_sd, feedback, tmp_path / "a", **common, **{"train.max_steps": 4})
    _run(tiny_sd, feedback, tmp_path / "b", **common, **{"train.max_steps": 2})
    resumed = _run(tiny_sd, feedback, tmp_path / "b", **common, **{"train.max_steps": 4, "train.resume": "latest"})
    assert resumed.micro_step == 5 and resumed.guard.skipped == 1
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["skipped_steps"] == 1
