"""Whole (unsharded) state dicts of an FSDP 2 model and its optimizer, for our own checkpoints and the export.

Under FSDP every process holds a shard of each parameter (a DTensor) and of its optimizer state, so neither
``module.state_dict()`` nor ``optimizer.state_dict()`` is the whole thing. These helpers gather them into plain CPU
tensors on the main process (FULL_STATE_DICT) and load whole state dicts back into the shards, with
``torch.distributed.checkpoint.state_dict``. Every function is a collective call: every process must make it."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _options(**kw):
    """StateDictOptions for whole (not sharded) state dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model state dict on CPU on the main process (an empty dict on the others)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(cpu_offload=True))


def gather_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state (keyed by parameter name) on CPU on the main process (empty on the others)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options(cpu_offload=True))


def load_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Shard a whole state dict (held by every process) into the module; it must hold every trainable parameter
    (a LoRA checkpoint holds only the adapters)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    result = set_model_state_dict(module, state, options=_options(strict=False))
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected "
                         f"{list(result.unexpected_keys)[:5]}")


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Shard a whole optimizer state (from :func:`gather_optimizer_state`, held by every process) into the optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=_options())
