"""Diffusion-KTO that also uses pairs whenever the batch has them: a sample whose prompt has an image of the other
label in the global batch adds a Bradley-Terry term on the two implicit rewards (docs/method.md). Without such a
prompt the loss, its gradient and every state are KTO's, bit for bit."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import losses
from .base import Errors, Gather, LossOutput, prompt_groups
from .kto import KTO

EMPTY_PROMPT = int(prompt_groups([""])[0])  # caption dropout: images of different prompts share it, so never pair


class KTOPaired(KTO):
    """loss_i = KTO_i (Eq. 8) + lambda * mean over same-prompt partners j of the other label of
    -log sigma(s_i beta (g_i - g_j)); rows without a partner keep KTO_i as it is."""

    name = "kto_paired"

    def __init__(self, *, pair_weight: float = 1.0, **kto: Any):
        super().__init__(**kto)
        self.pair_weight = pair_weight  # lambda

    @classmethod
    def from_config(cls, cfg: Any) -> KTOPaired:
        """KTO's loss.* settings and loss.pair_weight."""
        objective = super().from_config(cfg)
        objective.pair_weight = cfg.loss.pair_weight
        return objective

    def loss(self, errors: Errors, desirable: Tensor, gather: Gather, groups: Tensor | None = None) -> LossOutput:
        """KTO's output, plus the pair term on the rows that have a partner; the number of pairs in the global batch
        and the share ranked right (NaN without pairs) are logged."""
        if groups is None:
            raise ValueError("loss.name=kto_paired needs the prompt ids of the batch (groups)")
        out = super().loss(errors, desirable, gather, groups)
        device = errors.policy.device
        g = losses.implicit_reward(errors.policy, errors.reference)  # (B,) with gradient
        liked, ids = desirable.to(device).bool(), groups.to(device)
        # every process gathers, pairs or not (collectives must match)
        g_all, liked_all, ids_all = gather(g.detach()), gather(liked), gather(ids)  # (N,)
        pairs = losses.same_prompt_pairs(g, liked, ids, g_all, liked_all, ids_all, beta=self.beta,
                                         pairable=ids != EMPTY_PROMPT, pairable_all=ids_all != EMPTY_PROMPT)
        metrics = {**out.metrics, **_pair_metrics(g_all, liked_all, ids_all, self.beta)}
        if not bool(pairs.partners.any()):
            return LossOutput(out.losses, metrics)  # KTO's own tensor: nothing changes
        paired = out.losses + self.pair_weight * pairs.losses.to(out.losses)  # (B,)
        return LossOutput(torch.where(pairs.partners > 0, paired, out.losses), metrics)


def _pair_metrics(g_all: Tensor, liked_all: Tensor, ids_all: Tensor, beta: float) -> dict[str, float]:
    """The global batch's same-prompt (liked, disliked) pairs and the share with g_liked > g_disliked."""
    usable = ids_all != EMPTY_PROMPT
    every = losses.same_prompt_pairs(g_all, liked_all, ids_all, g_all, liked_all, ids_all, beta=beta,
                                     pairable=usable, pairable_all=usable)
    rows = every.mask & liked_all.reshape(-1, 1)  # (N, N): each pair once, its liked image as the row
    n = int(rows.sum())
    return {"pairs": float(n), "pair_accuracy": float((every.margins[rows] > 0).float().mean()) if n else float("nan")}
