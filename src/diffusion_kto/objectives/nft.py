"""A negative-aware objective after DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117), offline and from binary labels:
the policy's and the reference's predictions define an implicit positive and an implicit negative policy; liked
images regress the positive one to the target, disliked images the negative one (docs/method.md)."""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from .. import losses
from .base import Errors, ForwardPlan, Gather, LossOutput, Objective, class_mean


class NFT(Objective):
    """loss_i = ||v_i^{s} - target||^2 / beta', v+ = beta' v_theta + (1 - beta') v_ref, v- = (1 + beta') v_ref -
    beta' v_theta, s the label; no reward model, no reference point (DiffusionNFT's policy loss with r in {0, 1})."""

    name = "nft"
    needs_reference = True

    def __init__(self, beta: float = 1.0):
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"nft beta must be a finite number > 0, got {beta}")
        self.beta = beta  # beta' of the implicit policies: 1 makes the liked term SFT exactly

    @classmethod
    def from_config(cls, cfg: Any) -> NFT:
        """loss.nft_beta of a run config (loss.beta is the KTO / BCO / DPO scale of g and is not read)."""
        return cls(cfg.loss.nft_beta)

    def plan(self, micro_step: int, batch_size: int) -> ForwardPlan:
        """The reference's predictions, and every raw prediction (the loss mixes outputs, not errors)."""
        return ForwardPlan(reference=True, outputs=True)

    def loss(self, errors: Errors, desirable: Tensor, gather: Gather, groups: Tensor | None = None) -> LossOutput:
        """Per-sample losses; the errors of the implicit policies per class, the policy's deviation from the
        reference, and the share of samples whose implicit reward g = ref_err - policy_err has the label's sign."""
        o = errors.outputs
        if o is None or o.reference is None:
            raise ValueError("loss.name=nft needs the raw policy and reference predictions (ForwardPlan.outputs)")
        out = losses.nft_loss(o.policy, o.reference, o.target, desirable, beta=self.beta, weight=o.weight)
        liked = gather(desirable.to(out.losses.device)).bool()  # (N,) over the global batch
        pos, neg = gather(out.positive_err), gather(out.negative_err)
        g = gather(losses.implicit_reward(errors.policy.detach(), errors.reference).float())  # (N,)
        right = (g > 0) == liked  # g > 0: the policy denoises the image better than the reference
        return LossOutput(out.losses, {
            "positive_err": class_mean(pos[liked]), "negative_err": class_mean(neg[~liked]),
            "deviation": float(gather(out.deviation).mean()), "accuracy": float(right.float().mean()),
            "ref_err": errors.reference.mean().item(),
        })
