"""Two CPU processes (DDP or FSDP 2 over gloo) train exactly what one process with the doubled batch trains.

Counter-based randomness makes every sample's draws depend only on (seed, draw id), the DesirableSampler gives
each rank its slice of the global batch, and the reference point is taken over the gathered global batch; so
2 processes x batch 2 see the same samples, noise, timesteps and Q_ref as 1 process x batch 4.

Tolerance: the exported LoRA weights agree to ATOL = 1e-4. They cannot agree bit for bit: the gradient
all-reduce sums the two ranks' mean gradients in a different order than one process averages four samples, and
CPU kernels block a batch of 2 differently from a batch of 4, so fp32 results differ in the last bits, which
beta = 5000 and Adam's normalisation amplify (observed: 1.3e-5). A rank-local reference point instead of the
gathered one moves the same weights by 3e-3 (checked by hand with a patched trainer), 30x above ATOL.

FSDP 2 (the shipped configs/accelerate/fsdp.yaml with --num_processes 2): a full fine-tune whose UNet is sharded
across the two processes (the frozen reference copy is not), exported through a gathered whole state dict, agrees
with the one-process UNet to the same ATOL (observed: 1.8e-5 after 3 steps that move the weights by 2.8e-3), for
the same reason (FSDP reduce-scatters the gradients instead of all-reducing them). LoRA under FSDP: the same check, marked slow.

DeepSpeed ZeRO-2 (the shipped configs/accelerate/deepspeed-zero2.yaml, --num_processes 2; skipped without the
deepspeed package, which CI does not install): a full fine-tune with clipping and a linear LR schedule acting agrees
with one process to the same ATOL (observed: 5.6e-6 after 3 steps that move the weights by 2.0e-3; LoRA, slow: 5.0e-6),
and so does a run with NaN losses at a boundary and a non-boundary micro-step (the engine discards each such window's
gradients and skips the step; without that the check fails). A success also means the run was DeepSpeed: the trainer
refuses a DeepSpeed launch that accelerate runs as anything else.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tiny import tiny_overrides
from diffusion_kto.config import load_config
from diffusion_kto.train import DiffusionKTOTrainer
from diffusion_kto.train.distributed import launch

ATOL = 1e-4
RUN = {"lora.rank": 4, "loss.reference_point": "matched", "loss.beta": 5000.0, "train.max_steps": 3}
FULL_RUN = {**RUN, "lora.rank": 0}
LORA_FILE = "pytorch_lora_weights.safetensors"
LAUNCH = ["accelerate.commands.launch", "--config_file", "CONFIG", "--num_processes", "2", "--main_process_port", "0"]
TRAIN = ["-m", "diffusion_kto.cli", "train"]


def _env():
    """Offline, one thread per process, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in launch._RANK_VARIABLES + ("MASTER_ADDR", "MASTER_PORT")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _single_process(tiny_sd, feedback, out, run):
    """The reference: one process, global batch 4, in this process."""
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, out, **run, **{"train.batch_size": 4}))
    DiffusionKTOTrainer(cfg).train()
    return out


def _assert_close(one, two, moved_keys, what):
    """Same keys, weights within ATOL, and the run moved the weights in ``moved_keys`` well beyond ATOL."""
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= ATOL, f"2-process {what} differs from 1-process {what} by {worst:.3g} > {ATOL}"
    assert max(moved_keys(k) for k in one) > 10 * ATOL


def _assert_same_lora(one_dir, two_dir):
    """The exported LoRAs agree within ATOL, and the run moved them (LoRA B starts at 0)."""
    one, two = load_file(one_dir / LORA_FILE), load_file(two_dir / LORA_FILE)
    moved = lambda k: one[k].abs().max().item() if "lora_B" in k or "lora.up" in k else 0.0  # noqa: E731
    _assert_close(one, two, moved, "LoRA")


def _assert_same_unet(one_dir, two_dir, base):
    """Both exported UNets load with diffusers and agree within ATOL; the run moved them away from ``base``."""
    from diffusers import UNet2DConditionModel

    one, two, start = (UNet2DConditionModel.from_pretrained(d).state_dict() for d in (one_dir, two_dir, base))
    _assert_close(one, two, lambda k: (one[k] - start[k]).abs().max().item(), "UNet")


def _two_processes(launcher, tiny_sd, feedback, tmp_path, run=RUN):
    """Start the 2 x batch 2 run as a subprocess, train the 1 x batch 4 reference meanwhile: (one dir, two dir, stderr)."""
    out2 = tmp_path / "two"
    args = tiny_overrides(tiny_sd, feedback, out2, **run, **{"train.batch_size": 2})
    proc = subprocess.Popen([sys.executable, "-m", *launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    try:
        one = _single_process(tiny_sd, feedback, tmp_path / "one", run)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    assert stdout.count(f"trained {run['train.max_steps']} steps") == 1  # the main process reports
    return one, out2, stderr


def test_two_cpu_processes_match_one_process_with_double_batch(tiny_sd, feedback, tmp_path):
    _assert_same_lora(*_two_processes(["diffusion_kto.cli", "train", "--num-processes", "2"], tiny_sd, feedback,
                                      tmp_path)[:2])


def test_sdxl_two_cpu_processes_match_one_process_with_double_batch(tiny_sdxl, tmp_path):
    """The same on the tiny SDXL, with random crops of images of several sizes: each sample's time ids come with it."""
    from tiny import write_feedback

    data = write_feedback(tmp_path / "xl-data", sizes=[(24, 16), (16, 20), (16, 16), (40, 18)])
    run = {**RUN, "data.center_crop": False}
    _assert_same_lora(*_two_processes(["diffusion_kto.cli", "train", "--num-processes", "2"], tiny_sdxl, data,
                                      tmp_path, run)[:2])


@pytest.mark.slow
def test_accelerate_launch_cpu_starts_two_gloo_processes(tiny_sd, feedback, tmp_path):
    launcher = ["accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m", "diffusion_kto.cli", "train"]
    one, two, stderr = _two_processes(launcher, tiny_sd, feedback, tmp_path)
    _assert_same_lora(one, two)
    assert "starting 2 gloo processes" in stderr


def _launch(config="fsdp.yaml", *program):
    """``accelerate launch`` with a shipped accelerate config on 2 processes, of ``dkto train`` by default."""
    return [str(_shipped(config)) if a == "CONFIG" else a for a in LAUNCH] + list(program or TRAIN)


def _shipped(name):
    """A shipped accelerate config."""
    from pathlib import Path

    import diffusion_kto

    return Path(diffusion_kto.__file__).parent / "configs" / "accelerate" / name


def test_fsdp_two_cpu_processes_match_one_process_full_finetune(tiny_sd, feedback, tmp_path):
    one, two, _ = _two_processes(_launch(), tiny_sd, feedback, tmp_path, FULL_RUN)
    _assert_same_unet(one / "unet", two / "unet", tiny_sd / "unet")


@pytest.mark.slow
def test_fsdp_two_cpu_processes_match_one_process_lora(tiny_sd, feedback, tmp_path):
    """LoRA under FSDP: the reference is the sharded UNet with its adapters disabled."""
    _assert_same_lora(*_two_processes(_launch(), tiny_sd, feedback, tmp_path)[:2])


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (CI does not install it)")
DS_RUN = {**FULL_RUN, "optim.max_grad_norm": 0.01, "optim.lr_scheduler": "linear"}  # clipping and the schedule act


@needs_deepspeed
def test_deepspeed_zero2_two_cpu_processes_match_one_process_full_finetune(tiny_sd, feedback, tmp_path):
    one, two, _ = _two_processes(_launch("deepspeed-zero2.yaml"), tiny_sd, feedback, tmp_path, DS_RUN)
    _assert_same_unet(one / "unet", two / "unet", tiny_sd / "unet")


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_zero2_two_cpu_processes_match_one_process_lora(tiny_sd, feedback, tmp_path):
    """LoRA under ZeRO-2: the reference is the engine's UNet with its adapters disabled."""
    run = {**DS_RUN, "lora.rank": 4}
    _assert_same_lora(*_two_processes(_launch("deepspeed-zero2.yaml"), tiny_sd, feedback, tmp_path, run)[:2])


@needs_deepspeed
def test_deepspeed_skips_non_finite_steps_like_one_process(tiny_sd, feedback, tmp_path, monkeypatch):
    """NaN losses at micro-step 1 (a boundary, after micro-step 0's backward) and 4 (not a boundary), 2 micro-steps a
    step: DeepSpeed discards both windows (two skipped steps: micro-step 5's gradients are not applied alone), as one
    process without it does."""
    import json
    from pathlib import Path

    from diffusion_kto import losses
    from nan_loss_run import nan_at

    monkeypatch.setattr(losses, "kto_loss", losses.kto_loss)  # put back after the test
    nan_at({1, 4})  # the one-process run, in this process
    monkeypatch.setenv("DKTO_NAN_MICRO_STEPS", "1,4")  # the DeepSpeed processes
    script = str(Path(__file__).parent / "nan_loss_run.py")
    one, two, _ = _two_processes(_launch("deepspeed-zero2.yaml", script), tiny_sd, feedback, tmp_path,
                                 {**DS_RUN, "train.grad_accum": 2})
    _assert_same_unet(one / "unet", two / "unet", tiny_sd / "unet")
    assert [json.loads((d / "summary.json").read_text())["skipped_steps"] for d in (one, two)] == [2, 2]


def test_ddp_skips_a_window_with_a_non_finite_micro_step_like_one_process(tiny_sd, feedback, tmp_path, monkeypatch):
    """DDP (2 gloo processes): NaN losses at micro-step 1 (a boundary) and 4 (not a boundary), 2 micro-steps a step.
    Every process skips the backward of the rest of a poisoned window (no all-reduce is left waiting), both windows
    are skipped, and the weights agree with one process."""
    import json
    from pathlib import Path

    from diffusion_kto import losses
    from nan_loss_run import nan_at

    monkeypatch.setattr(losses, "kto_loss", losses.kto_loss)  # put back after the test
    nan_at({1, 4})
    monkeypatch.setenv("DKTO_NAN_MICRO_STEPS", "1,4")
    script = str(Path(__file__).parent / "nan_loss_run.py")
    one, two, _ = _two_processes(_launch("multi-gpu-ddp.yaml", script), tiny_sd, feedback, tmp_path,
                                 {**RUN, "train.grad_accum": 2})
    _assert_same_lora(one, two)
    assert [json.loads((d / "summary.json").read_text())["skipped_steps"] for d in (one, two)] == [2, 2]


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


def _launched(kind, fsdp_version=2):
    """A stand-in Accelerator with a distributed type (and an FSDP plugin version)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(fsdp_version=fsdp_version)
    return SimpleNamespace(distributed_type=DistributedType[kind], state=SimpleNamespace(fsdp_plugin=plugin))


def test_trainer_refuses_megatron(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    from diffusion_kto.config import ConfigError
    from diffusion_kto.train.distributed import require_supported_distribution

    with pytest.raises(ConfigError, match="MEGATRON_LM is not supported"):
        require_supported_distribution(_launched("MEGATRON_LM"))


def test_trainer_refuses_a_deepspeed_launch_that_accelerate_ran_as_ddp(monkeypatch):
    """With --cpu / ACCELERATE_USE_CPU accelerate ignores a DeepSpeed launch (MULTI_CPU, plain DDP): refused."""
    from diffusion_kto.config import ConfigError
    from diffusion_kto.train.distributed import require_supported_distribution

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    require_supported_distribution(_launched("DEEPSPEED"))
    with pytest.raises(ConfigError, match="runs it as MULTI_CPU"):
        require_supported_distribution(_launched("MULTI_CPU"))


def test_deepspeed_takes_batch_accumulation_and_clipping_from_the_run_config(tiny_sd, feedback, tmp_path):
    from diffusion_kto.config import ConfigError
    from diffusion_kto.train.distributed import zero

    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path, **{"train.batch_size": 3, "train.grad_accum": 2,
                                                                           "optim.max_grad_norm": 0.5}))
    ds = {"gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 2}}
    zero.fill(ds, cfg)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (3, 2, 0.5)
    with pytest.raises(ConfigError, match="gradient_clipping=1.0, the run config 0.5"):
        zero.fill({"gradient_clipping": 1.0}, cfg)
    zero._require_ported(cfg)  # tiny_overrides: no checkpoints, fp32
    for bad in ({"train.checkpoint_every": 5}, {"train.resume": "latest"}, {"train.mixed_precision": "bf16"}):
        cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path, **bad))
        with pytest.raises(ConfigError, match="not supported under DeepSpeed"):
            zero._require_ported(cfg)


def test_trainer_takes_ddp_and_fsdp2_but_refuses_fsdp1(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    from diffusion_kto.config import ConfigError
    from diffusion_kto.train.distributed import require_supported_distribution

    for kind in ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP"):
        require_supported_distribution(_launched(kind))
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        require_supported_distribution(_launched("FSDP", fsdp_version=1))


def test_resume_refuses_a_checkpoint_of_the_other_layout(tmp_path):
    from diffusion_kto.config import ConfigError
    from diffusion_kto.train.distributed import require_same_optimizer_layout

    ddp, fsdp = ({"state": {}, "param_groups": [{"params": params}]} for params in ([0, 1], ["conv_in.weight"]))
    require_same_optimizer_layout(ddp, fsdp=False, path=tmp_path)
    require_same_optimizer_layout(fsdp, fsdp=True, path=tmp_path)
    with pytest.raises(ConfigError, match="written by an FSDP run"):
        require_same_optimizer_layout(fsdp, fsdp=False, path=tmp_path)
    with pytest.raises(ConfigError, match="cannot be resumed under FSDP"):
        require_same_optimizer_layout(ddp, fsdp=True, path=tmp_path)


@pytest.mark.slow
def test_fsdp_resume_equals_uninterrupted(tiny_sd, feedback, tmp_path):
    """2 FSDP processes: 3 straight steps == the step-2 checkpoint (gathered whole) + resume + 1 step, bitwise."""
    import shutil

    def launch(out, **extra):
        args = tiny_overrides(tiny_sd, feedback, out, **FULL_RUN, **{"train.batch_size": 2, **extra})
        done = subprocess.run([sys.executable, "-m", *_launch(), *args], capture_output=True, text=True,
                              env=_env(), timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]

    launch(tmp_path / "a", **{"train.checkpoint_every": 2})
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-00000002", tmp_path / "b" / "checkpoints" / "checkpoint-00000002")
    launch(tmp_path / "b", **{"train.checkpoint_every": 2, "train.resume": "latest"})
    straight, resumed = (load_file(tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors") for d in "ab")
    assert straight.keys() == resumed.keys()
    assert all((straight[k] == resumed[k]).all() for k in straight)


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


def test_a_deepspeed_launch_without_cuda_is_not_turned_into_a_cpu_group(monkeypatch):
    """ACCELERATE_USE_CPU would make accelerate run a DeepSpeed launch as plain DDP; the trainer gives DeepSpeed gloo."""
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    launch.join_cpu_group_without_cuda()
    assert "ACCELERATE_USE_CPU" not in os.environ
