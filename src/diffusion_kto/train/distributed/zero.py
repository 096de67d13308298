"""DeepSpeed ZeRO-2 launches (``accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml``).

The run config decides what DeepSpeed would otherwise take from the accelerate config: the micro-batch
(``train.batch_size``), gradient accumulation (``train.grad_accum``) and gradient clipping (``optim.max_grad_norm``).
What the trainer has not been ported to under DeepSpeed is refused with a :class:`ConfigError` (see
docs/multi-gpu.md#deepspeed). DeepSpeed itself is imported by accelerate only, and only on such a launch."""
from __future__ import annotations

import os

import torch

from ...config import Config, ConfigError

# DeepSpeed config key -> the run config field that sets it (an explicit, different value in the accelerate config
# is refused)
_FROM_RUN_CONFIG = {"train_micro_batch_size_per_gpu": "train.batch_size",
                    "gradient_accumulation_steps": "train.grad_accum",
                    "gradient_clipping": "optim.max_grad_norm"}


def launched() -> bool:
    """Whether this process was started by ``accelerate launch`` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def accelerator_kwargs(cfg: Config) -> dict:
    """Extra ``Accelerator`` arguments for a DeepSpeed launch (none otherwise): a DeepSpeed plugin built from the
    launch's environment and filled from the run config, and without CUDA DeepSpeed's CPU accelerator and gloo (with
    neither, accelerate finds no backend and runs every process as a lone one)."""
    if not launched():
        return {}
    _require_ported(cfg)
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    kwargs: dict = {}
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    plugin = DeepSpeedPlugin()
    if plugin.zero_stage != 2:
        raise ConfigError(f"DeepSpeed ZeRO stage {plugin.zero_stage}: only zero_stage: 2 is supported by the trainer "
                          "(configs/accelerate/deepspeed-zero2.yaml), see docs/multi-gpu.md#deepspeed")
    if plugin.deepspeed_config.get("zero_optimization", {}).get("compute_grad_norm") is False:
        raise ConfigError("zero_optimization.compute_grad_norm=false: DeepSpeed would then apply steps with non-finite "
                          "gradients in fp32, which the trainer must skip; remove it, see docs/multi-gpu.md#deepspeed")
    fill(plugin.deepspeed_config, cfg)
    return {**kwargs, "deepspeed_plugin": plugin}


def fill(ds_config: dict, cfg: Config) -> None:
    """Set the micro-batch, accumulation and clipping of a DeepSpeed config from the run config; refuse explicit,
    different values (``auto`` or absent is fine)."""
    for key, name in _FROM_RUN_CONFIG.items():
        section, field = name.split(".")
        value, given = getattr(getattr(cfg, section), field), ds_config.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key}={given}, the run config {value} ({name}); remove "
                              f"{key} from the accelerate / DeepSpeed config, the trainer sets it")
        ds_config[key] = value
    ds_config["train_batch_size"] = "auto"  # micro-batch x accumulation x processes, filled in by accelerate


def _require_ported(cfg: Config) -> None:
    """Refuse what the trainer does not do under DeepSpeed: its own checkpoints / resume (ZeRO partitions the
    optimizer state) and mixed precision (DeepSpeed casts the trained UNet itself, not ported or verified)."""
    why = "see docs/multi-gpu.md#deepspeed"
    if cfg.train.checkpoint_every or cfg.train.resume is not None:
        raise ConfigError("train.checkpoint_every / train.resume are not supported under DeepSpeed (ZeRO-2 partitions "
                          "the optimizer state across processes and it is not consolidated into our checkpoints); set "
                          f"train.checkpoint_every=0 (the export at the end is written), or use DDP / FSDP; {why}")
    if cfg.train.mixed_precision != "no":
        raise ConfigError(f"train.mixed_precision={cfg.train.mixed_precision} is not supported under DeepSpeed (it "
                          "would cast the trained UNet itself instead of autocasting, which is not ported); use "
                          f"train.mixed_precision=no, or DDP / FSDP; {why}")


def poison(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """A loss whose gradient is NaN for every parameter: backpropagated at an accumulation boundary whose loss was
    not finite, it makes DeepSpeed's step discard the window's gradients (a non-finite gradient norm skips the step
    and zeroes the gradients) instead of carrying them into the next window."""
    return sum(p.sum() for p in params) * float("nan")
