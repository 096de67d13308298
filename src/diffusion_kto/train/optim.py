"""The optimizer (AdamW, or bitsandbytes 8-bit AdamW) and its learning-rate schedule, from ``optim.*``."""
from __future__ import annotations

import torch

from ..config import Config, ConfigError


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (bitsandbytes 8-bit AdamW with optim.use_8bit_adam)."""
    o = cfg.optim
    if not params:
        raise RuntimeError("the model has no trainable parameters")
    kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon, weight_decay=o.weight_decay)
    if not o.use_8bit_adam:
        return torch.optim.AdamW(params, **kwargs)
    if params[0].device.type != "cuda":
        raise ConfigError(
            f"optim.use_8bit_adam=true needs a CUDA GPU (bitsandbytes' 8-bit AdamW keeps its state on the GPU); this "
            f"run trains on {params[0].device.type}: set optim.use_8bit_adam=false"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "optim.use_8bit_adam=true needs bitsandbytes: pip install bitsandbytes (CUDA machines), "
            "or set optim.use_8bit_adam=false"
        ) from None
    return bnb.optim.AdamW8bit(params, **kwargs)


def build_lr_scheduler(cfg: Config, optimizer: torch.optim.Optimizer):
    """Warm-up then constant / linear / cosine decay over train.max_steps optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.optim.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                         num_training_steps=cfg.train.max_steps)
