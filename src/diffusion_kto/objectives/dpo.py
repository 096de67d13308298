"""Diffusion-DPO (Wallace et al. 2024) as an objective: pairs of the same prompt, one noise and t per pair."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .. import losses
from ..errors import ConfigError
from .base import Errors, ForwardPlan, Gather, LossOutput, Objective


class DPO(Objective):
    """-log sigma(-beta/2 ((policy_w - policy_l) - (ref_w - ref_l))) per pair; a batch holds every preferred image
    first, then their rejected partners in the same order."""

    name = "dpo"
    needs_reference = True
    paired = True

    def __init__(self, beta: float):
        self.beta = beta

    @classmethod
    def from_config(cls, cfg: Any) -> DPO:
        """loss.beta of a run config."""
        return cls(cfg.loss.beta)

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Pairs are formed from rows of the same prompt, which a stream cannot look up."""
        if cfg.data.streaming:
            raise ConfigError(
                "data.streaming: loss.name=dpo pairs same-prompt rows, which a stream cannot look up; "
                "make pairs first (dkto convert to-pairs) and train without streaming, or use kto / sft / csft"
            )

    def liked_share(self, gamma: float) -> float:
        """Pairs are drawn uniformly."""
        return 1.0

    def plan(self, micro_step: int, batch_size: int) -> ForwardPlan:
        """The reference's errors on both images of every pair."""
        return ForwardPlan(reference=True)

    def loss(self, errors: Errors, desirable: Tensor, gather: Gather, groups: Tensor | None = None) -> LossOutput:
        """Per-pair losses, the share of pairs ranked right and the mean margin."""
        (pw, pl), (rw, rl) = errors.policy.chunk(2), errors.reference.chunk(2)
        out = losses.dpo_loss(pw, pl, rw, rl, beta=self.beta)
        return LossOutput(out.losses, {"accuracy": out.accuracy.item(), "margin": out.margins.mean().item(),
                                       "ref_err": errors.reference.mean().item()})
