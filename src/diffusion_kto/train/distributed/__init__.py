"""Distributed plumbing in one home: the run's accelerator (one process, DDP, FSDP 2 or DeepSpeed ZeRO-2) and what
the trainer refuses, whole state dicts under FSDP (:mod:`.fsdp`), ZeRO-2 launches (:mod:`.zero`), and the
multi-process re-launch of `dkto train --num-processes` (:mod:`.launch`)."""
from __future__ import annotations

import os
from pathlib import Path

from ...config import Config, ConfigError
from . import fsdp, zero

__all__ = ["fsdp", "require_same_optimizer_layout", "require_supported_distribution", "setup_accelerator", "zero"]


def setup_accelerator(cfg: Config, out: Path, log_with: str | None):
    """The run's Accelerator (precision, accumulation, trackers, DeepSpeed plugin), with FSDP kept on CPU processes
    and unsupported set-ups refused before any model loads."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    AcceleratorState._reset_state()  # several runs in one process (demo, benchmarks) may differ in precision
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        **zero.accelerator_kwargs(cfg),
    )
    _fsdp_on_cpu(accelerator)
    require_supported_distribution(accelerator)
    _require_fp16_device(accelerator, cfg.train.mixed_precision)
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """Keep FSDP on CPU processes. accelerate (1.15) applies an FSDP launch's plugin only on accelerator devices and
    runs CPU processes (MULTI_CPU, gloo) as plain DDP, silently; put FSDP back the way AcceleratorState does on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* environment, as accelerate builds it
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # both singletons, as AcceleratorState does: every later AcceleratorState() copies PartialState's value back
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


def _require_fp16_device(accelerator, precision: str) -> None:
    """Refuse fp16 where accelerate sets up no autocast and gradient scaler (a CPU): it would fail on dtypes later.
    (DeepSpeed launches refuse mixed precision before the accelerator exists: :func:`.zero.accelerator_kwargs`.)"""
    if precision == "fp16" and accelerator.scaler is None:
        raise ConfigError(
            f"train.mixed_precision=fp16 needs a CUDA device (accelerate sets up fp16 autocast and its gradient scaler "
            f"only there); this process runs on {accelerator.device.type}: use train.mixed_precision=bf16 or no"
        )


def require_supported_distribution(accelerator) -> None:
    """Refuse what the trainer cannot run: Megatron-LM, FSDP 1, and a DeepSpeed launch that accelerate ran as
    something else (``--cpu`` / ``ACCELERATE_USE_CPU`` make it plain DDP). DDP, FSDP 2 and DeepSpeed ZeRO-2 (with the
    limits of :mod:`.zero`) are supported."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(
            "accelerate FSDP 1 is not supported by the trainer (its flat parameters hide the LoRA / reference "
            "structure); set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml), see docs/multi-gpu.md"
        )
    if zero.launched() and kind != "DEEPSPEED":
        raise ConfigError(
            f"this is a DeepSpeed launch, but accelerate runs it as {kind} (plain data parallel, without DeepSpeed), "
            "which happens with --cpu or ACCELERATE_USE_CPU=1; drop those (without CUDA the trainer sets up "
            "DeepSpeed's CPU accelerator and gloo itself), see docs/multi-gpu.md#deepspeed"
        )
    if kind == "MEGATRON_LM":
        raise ConfigError(
            "accelerate distributed_type MEGATRON_LM is not supported by the trainer; launch with "
            "configs/accelerate/multi-gpu-ddp.yaml, fsdp.yaml or deepspeed-zero2.yaml instead, see docs/multi-gpu.md"
        )


def require_same_optimizer_layout(optimizer: dict, *, fsdp: bool, path: Path) -> None:
    """A checkpoint's optimizer state is keyed by parameter index (DDP, one process) or by name (FSDP); refuse the
    other kind with a clear message instead of a KeyError deep in torch."""
    params = [p for group in optimizer.get("param_groups", []) for p in group.get("params", [])]
    by_name = bool(params) and isinstance(params[0], str)
    if params and by_name != fsdp:
        written, now = ("an FSDP", "without FSDP") if by_name else ("a DDP / single-process", "under FSDP")
        raise ConfigError(f"train.resume: {path} was written by {written} run and cannot be resumed {now}; resume it "
                          "with the accelerate config it was trained with")
