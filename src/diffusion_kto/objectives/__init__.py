"""Objectives: one object per ``loss.name``, which says what it needs and computes its loss (see :mod:`.base`).

This registry is the only place that maps a name to an objective; nothing else switches on ``loss.name``."""
from __future__ import annotations

from typing import Any

from .base import Errors, ForwardPlan, Gather, LossOutput, Objective, Outputs, class_mean, prompt_groups
from .baselines import CSFT, SFT, csft_prompt
from .bco import BCO, SHIFTS as REWARD_SHIFTS
from .dpo import DPO
from .kto import KTO
from .kto_paired import KTOPaired
from .nft import NFT

# the paper's method and baselines first, then the objectives beyond the paper (docs/method.md)
OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (KTO, SFT, CSFT, DPO, KTOPaired, BCO, NFT)}

__all__ = ["BCO", "CSFT", "DPO", "Errors", "ForwardPlan", "Gather", "KTO", "KTOPaired", "LossOutput", "NFT",
           "OBJECTIVES", "Objective", "Outputs", "REWARD_SHIFTS", "SFT", "build_objective", "class_mean",
           "csft_prompt", "objective_class", "prompt_groups"]


def objective_class(name: str) -> type[Objective]:
    """The objective registered as ``name`` (KeyError listing the names otherwise)."""
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective(cfg: Any) -> Objective:
    """The objective of a validated run config (``loss.name``)."""
    return objective_class(cfg.loss.name).from_config(cfg)
