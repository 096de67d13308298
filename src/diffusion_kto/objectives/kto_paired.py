"""Diffusion-KTO that also uses pairs whenever the data has them: a share of each batch is drawn as same-prompt
(liked, disliked) pairs whose two images share one noise and t, and each pair adds a Bradley-Terry term on the two
implicit rewards (docs/method.md). Without a prompt that has both labels the loss, its gradient and every state are
KTO's, bit for bit."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import losses
from ..errors import ConfigError
from .base import Errors, Gather, LossOutput, prompt_groups
from .kto import KTO

EMPTY_PROMPT = int(prompt_groups([""])[0])  # caption dropout: images of different prompts share it, so never pair


class KTOPaired(KTO):
    """loss_i = KTO_i (Eq. 8) + lambda * mean over partners j (same prompt, other label, same draw) of
    -log sigma(s_i beta (g_i - g_j)); rows without a partner keep KTO_i as it is."""

    name = "kto_paired"
    one_class_setting = ""

    @classmethod
    def needs_both(cls, gamma: float) -> bool:
        """Its pairs are a liked and a disliked row of one prompt: both classes at any gamma (one class is plain KTO)."""
        return True

    def __init__(self, *, pair_weight: float = 1.0, pair_share: float = 0.5, **kto: Any):
        super().__init__(**kto)
        self.pair_weight = pair_weight  # lambda
        self.pair_share = pair_share  # read by the trainer's sampler (data/sampler.py: PairedDrawSampler)

    @classmethod
    def from_config(cls, cfg: Any) -> KTOPaired:
        """KTO's loss.* settings, loss.pair_weight and loss.pair_share."""
        objective = super().from_config(cfg)
        objective.pair_weight, objective.pair_share = cfg.loss.pair_weight, cfg.loss.pair_share
        return objective

    @classmethod
    def check(cls, cfg: Any) -> None:
        """KTO's checks; pairs are drawn by prompt, which a stream cannot look up."""
        super().check(cfg)
        if cfg.data.streaming and cfg.loss.pair_share > 0:
            raise ConfigError("data.streaming: loss.name=kto_paired draws same-prompt pairs, which a stream cannot "
                              "look up; set loss.pair_share=0 (plain KTO draws) or train without streaming")

    def loss(self, errors: Errors, desirable: Tensor, gather: Gather, groups: Tensor | None = None) -> LossOutput:
        """KTO's output, plus the pair term on the rows that have a partner; the number of pairs in the global batch
        and the share ranked right (NaN without pairs) are logged. With ``errors.draws`` a row pairs only with a
        partner of its own draw (the sampler's pairs); without, with any same-prompt row of the other label."""
        if groups is None:
            raise ValueError("loss.name=kto_paired needs the prompt ids of the batch (groups)")
        out = super().loss(errors, desirable, gather, groups)
        device = errors.policy.device
        g = losses.implicit_reward(errors.policy, errors.reference)  # (B,) with gradient
        liked, ids = desirable.to(device).bool(), groups.to(device)
        # every process gathers, pairs or not (collectives must match)
        g_all, liked_all, ids_all = gather(g.detach()), gather(liked), gather(ids)  # (N,)
        draws = None if errors.draws is None else errors.draws.to(device)
        draws_all = None if draws is None else gather(draws)
        pairs = losses.same_prompt_pairs(g, liked, ids, g_all, liked_all, ids_all, beta=self.beta,
                                         pairable=ids != EMPTY_PROMPT, pairable_all=ids_all != EMPTY_PROMPT,
                                         draws=draws, draws_all=draws_all)
        metrics = {**out.metrics, **_pair_metrics(g_all, liked_all, ids_all, draws_all, self.beta)}
        if not bool(pairs.partners.any()):
            return LossOutput(out.losses, metrics)  # KTO's own tensor: nothing changes
        paired = out.losses + self.pair_weight * pairs.losses.to(out.losses)  # (B,)
        return LossOutput(torch.where(pairs.partners > 0, paired, out.losses), metrics)


def _pair_metrics(g_all: Tensor, liked_all: Tensor, ids_all: Tensor, draws_all: Tensor | None,
                  beta: float) -> dict[str, float]:
    """The global batch's (liked, disliked) pairs and the share with g_liked > g_disliked."""
    usable = ids_all != EMPTY_PROMPT
    every = losses.same_prompt_pairs(g_all, liked_all, ids_all, g_all, liked_all, ids_all, beta=beta,
                                     pairable=usable, pairable_all=usable, draws=draws_all, draws_all=draws_all)
    rows = every.mask & liked_all.reshape(-1, 1)  # (N, N): each pair once, its liked image as the row
    n = int(rows.sum())
    return {"pairs": float(n), "pair_accuracy": float((every.margins[rows] > 0).float().mean()) if n else float("nan")}
