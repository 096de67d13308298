"""Two CPU processes (DDP over gloo) train exactly what one process with the doubled batch trains.

Counter-based randomness makes every sample's draws depend only on (seed, draw id), the DesirableSampler gives
each rank its slice of the global batch, and the reference point is taken over the gathered global batch; so
2 processes x batch 2 see the same samples, noise, timesteps and Q_ref as 1 process x batch 4.

Tolerance: the exported LoRA weights agree to ATOL = 1e-4. They cannot agree bit for bit: the gradient
all-reduce sums the two ranks' mean gradients in a different order than one process averages four samples, and
CPU kernels block a batch of 2 differently from a batch of 4, so fp32 results differ in the last bits, which
beta = 5000 and Adam's normalisation amplify (observed: 1.3e-5). A rank-local reference point instead of the
gathered one moves the same weights by 3e-3 (checked by hand with a patched trainer), 30x above ATOL.
"""
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tiny import tiny_overrides
from diffusion_kto.config import load_config
from diffusion_kto.train import DiffusionKTOTrainer
from diffusion_kto.train import launch

ATOL = 1e-4
RUN = {"lora.rank": 4, "loss.reference_point": "matched", "loss.beta": 5000.0, "train.max_steps": 3}
LORA_FILE = "pytorch_lora_weights.safetensors"


def _env():
    """Offline, one thread per process, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in launch._RANK_VARIABLES + ("MASTER_ADDR", "MASTER_PORT")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _single_process(tiny_sd, feedback, out):
    """The reference: one process, global batch 4, in this process."""
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, out, **RUN, **{"train.batch_size": 4}))
    DiffusionKTOTrainer(cfg).train()
    return load_file(out / LORA_FILE)


def _assert_same_lora(one, two):
    """Same keys, weights within ATOL, and the run moved them well beyond ATOL (LoRA B starts at 0)."""
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= ATOL, f"2-process LoRA differs from 1-process LoRA by {worst:.3g} > {ATOL}"
    moved = max(one[k].abs().max().item() for k in one if "lora_B" in k or "lora.up" in k)
    assert moved > 10 * ATOL


def _two_processes(launcher, tiny_sd, feedback, tmp_path):
    """Start the 2 x batch 2 run as a subprocess, train the 1 x batch 4 reference meanwhile, compare the LoRAs."""
    out2 = tmp_path / "two"
    args = tiny_overrides(tiny_sd, feedback, out2, **RUN, **{"train.batch_size": 2})
    proc = subprocess.Popen([sys.executable, "-m", *launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    try:
        one = _single_process(tiny_sd, feedback, tmp_path / "one")
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    assert stdout.count("trained 3 steps") == 1  # the main process reports; equal weights show both ranks trained
    _assert_same_lora(one, load_file(out2 / LORA_FILE))
    return stderr


def test_two_cpu_processes_match_one_process_with_double_batch(tiny_sd, feedback, tmp_path):
    _two_processes(["diffusion_kto.cli", "train", "--num-processes", "2"], tiny_sd, feedback, tmp_path)


@pytest.mark.slow
def test_accelerate_launch_cpu_starts_two_gloo_processes(tiny_sd, feedback, tmp_path):
    launcher = ["accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m", "diffusion_kto.cli", "train"]
    assert "starting 2 gloo processes" in _two_processes(launcher, tiny_sd, feedback, tmp_path)


def test_launch_command_is_accelerate_multi_process_on_cpu():
    cmd, env = launch.launch_command(3, ["--config", "c.yaml", "train.seed=1"], cpu=True)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "3" and "--multi_gpu" in cmd
    assert cmd[-5:] == ["diffusion_kto.cli", "train", "--config", "c.yaml", "train.seed=1"]
    assert env["ACCELERATE_USE_CPU"] == "1"
    assert launch.launch_command(2, [], cpu=False)[1].get("ACCELERATE_USE_CPU") == os.environ.get("ACCELERATE_USE_CPU")


def test_launch_args_read_from_accelerate_command_lines():
    tail = ["-m", "diffusion_kto.cli", "train", "train.batch_size=2"]
    assert launch.launch_args(["python", "/v/bin/accelerate", "launch", "--num_processes", "2", "--cpu", *tail]) == (2, 1)
    assert launch.launch_args(["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes=3", *tail]) == (3, 1)
    assert launch.launch_args(["python", "/v/bin/accelerate-launch", "--cpu", *tail]) == (None, 1)
    assert launch.launch_args(["python", "-m", "diffusion_kto.cli", "train"]) == (None, 1)


def test_lone_cpu_process_is_recognised(monkeypatch):
    for name in launch._RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(launch, "_parent_launch_args", lambda: (2, 1))
    assert launch.lone_cpu_processes() == 2
    monkeypatch.setattr(launch, "_parent_launch_args", lambda: (4, 2))
    assert launch.lone_cpu_processes() is None  # multi-node CPU: mpirun's business
    monkeypatch.setattr(launch, "_parent_launch_args", lambda: (None, 1))
    with pytest.raises(SystemExit, match="--num-processes"):
        launch.lone_cpu_processes()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.lone_cpu_processes() is None  # already one of several ranks
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("MASTER_ADDR")
    assert launch.lone_cpu_processes() is None  # a plain single-process run
    assert launch.maybe_launch(1, []) is None


def test_num_processes_must_be_positive():
    with pytest.raises(SystemExit, match=">= 1"):
        launch.maybe_launch(0, [])


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_trainer_refuses_sharded_distribution(kind):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffusion_kto.config import ConfigError
    from diffusion_kto.train.trainer import _require_data_parallel

    with pytest.raises(ConfigError, match="multi-gpu-ddp.yaml"):
        _require_data_parallel(SimpleNamespace(distributed_type=DistributedType[kind]))
    _require_data_parallel(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))


def test_shipped_accelerate_configs_load():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    import diffusion_kto

    folder = Path(diffusion_kto.__file__).parent / "configs" / "accelerate"
    kinds = {p.stem: str(load_config_from_file(str(p)).distributed_type) for p in folder.glob("*.yaml")}
    assert {k: v.rsplit(".", 1)[-1] for k, v in kinds.items()} == {
        "multi-gpu-ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED"}


def test_processes_without_cuda_join_one_cpu_group(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    launch.join_cpu_group_without_cuda()
    assert os.environ["ACCELERATE_USE_CPU"] == "1"
