"""Crash safety: kill -9 a real training process right after a checkpoint, resume, and match an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tiny import logged_metrics, tiny_overrides

STEPS = 6


def _train(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "diffusion_kto.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _by_step(path):
    """The last logged metrics line of every step (a killed run may have logged steps past its checkpoint)."""
    return {row["step"]: row for row in logged_metrics(path)}


def test_kill_after_random_checkpoint_then_resume_matches(tiny_sd, feedback, tmp_path):
    extra = {"lora.rank": 4, "train.max_steps": STEPS, "train.checkpoint_every": 1, "train.keep_checkpoints": 2}
    straight = _train(tiny_overrides(tiny_sd, feedback, tmp_path / "a", **extra))
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    kill_at = random.Random(os.getpid()).randint(2, STEPS - 2)
    victim = _train(tiny_overrides(tiny_sd, feedback, tmp_path / "b", **extra))
    marker = tmp_path / "b" / "checkpoints" / f"checkpoint-{kill_at:08d}"
    deadline = time.time() + 600
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "b" / "pytorch_lora_weights.safetensors").exists()

    resumed = _train(tiny_overrides(tiny_sd, feedback, tmp_path / "b", **extra, **{"train.resume": "latest"}))
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "resumed from" in out

    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bitwise on CPU
    la, lb = _by_step(tmp_path / "a" / "metrics.jsonl"), _by_step(tmp_path / "b" / "metrics.jsonl")
    assert set(la) == set(lb) == set(range(1, STEPS + 1))
    for step in range(kill_at + 1, STEPS + 1):
        assert la[step] == lb[step], step


def test_corrupt_latest_checkpoint_is_skipped(tmp_path, caplog):
    from diffusion_kto.train import checkpoint

    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, weights={"w": torch.full((2,), float(step))}, optimizer={},
                                   scheduler={}, state={"step": step}, config={}, keep=5)
    (tmp_path / "checkpoint-00000002" / "weights.safetensors").write_bytes(b"truncated")
    (tmp_path / ".tmp-checkpoint-00000003-1").mkdir()  # a half-written one from a crash
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-00000001"
    assert "checkpoint-00000002" in caplog.text
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint-00000001")["weights"]["w"].tolist() == [1.0, 1.0]


def test_rotation_keeps_newest(tmp_path):
    from diffusion_kto.train import checkpoint

    for step in range(1, 5):
        checkpoint.save_checkpoint(tmp_path, step, weights={"w": torch.zeros(1)}, optimizer={}, scheduler={},
                                   state={"step": step}, config={}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-00000003", "checkpoint-00000004"]
