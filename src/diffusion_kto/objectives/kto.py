"""Diffusion-KTO (paper Eq. 8) as an objective: the reference point, its amortized estimate, the loss and its log."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import losses
from ..errors import ConfigError
from .base import Errors, ForwardPlan, Gather, LossOutput, Objective


class KTO(Objective):
    """loss_i = lambda_y (1 - U(s_i beta (g_i - Q_ref))) with Q_ref from mismatched pairs, the batch, or 0 (§4.1)."""

    name = "kto"
    needs_reference = True
    one_class_setting = "data.desirable_ratio=1.0 (KTO's liked term alone) or 0.0 (its disliked term alone)"

    @classmethod
    def needs_both(cls, gamma: float) -> bool:
        """At gamma = 1 (or 0) only liked (or disliked) rows are drawn: Eq. 8 with every s_i = +1 (or -1) is defined
        on one class, its Q_ref taken from that class's rows; between, both classes are drawn and must exist."""
        return 0.0 < gamma < 1.0

    def __init__(self, *, beta: float, utility: str = "kt", reference_point: str = "mismatched",
                 reference_fraction: float = 1.0, reference_every: int = 1, reference_decay: float = 0.0,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self.beta, self.utility = beta, utility
        # mismatched (paper), matched (official script), per_prompt, centred (matched with its gradient), none
        self.reference_mode = reference_point
        self.fraction, self.every, self.decay = reference_fraction, reference_every, reference_decay
        self.weights = (desirable_weight, undesirable_weight)
        self.running: losses.RunningReference | None = None  # the running mismatched Q_ref (amortized)

    @classmethod
    def from_config(cls, cfg: Any) -> KTO:
        """The loss.* settings of a run config."""
        lc = cfg.loss
        return cls(beta=lc.beta, utility=lc.utility, reference_point=lc.reference_point,
                   reference_fraction=lc.reference_fraction, reference_every=lc.reference_every,
                   reference_decay=lc.reference_decay, desirable_weight=lc.desirable_weight,
                   undesirable_weight=lc.undesirable_weight)

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Mismatched pairs roll prompts within the batch: at least two samples must take part."""
        lc, batch = cfg.loss, cfg.train.batch_size
        if lc.reference_point != "mismatched":
            return
        if batch < 2:
            raise ConfigError(
                "loss.reference_point=mismatched needs train.batch_size >= 2 (prompts are rolled within the batch); "
                "use a larger batch or loss.reference_point=matched"
            )
        if math.ceil(lc.reference_fraction * batch) < 2:
            raise ConfigError(
                f"loss.reference_fraction={lc.reference_fraction} leaves fewer than 2 of train.batch_size="
                f"{batch} samples to roll prompts within; raise it to at least {2 / batch:g}"
            )

    def plan(self, micro_step: int, batch_size: int) -> ForwardPlan:
        """Reference errors always; mismatched errors of the first ceil(f B) samples every k-th micro-step."""
        fresh = self.reference_mode == "mismatched" and (self.running is None or micro_step % self.every == 0)
        return ForwardPlan(reference=True, mismatched=math.ceil(self.fraction * batch_size) if fresh else 0)

    def reference_point(self, errors: Errors, gather: Gather, groups: Tensor | None = None) -> Tensor:
        """Q_ref over the global batch: per-sample errors gathered from every process, then mean and clamp (§4.1).

        A mismatched estimate goes through the running mean of ``reference_decay``; micro-steps without a fresh one
        (``reference_every`` > 1) reuse it. ``centred``: the matched mean with its gradient and no clamp.
        ``per_prompt``: one Q_ref per sample, over the batch's samples of its prompt (``groups``: (B,) prompt ids),
        shape (B,)."""
        device = errors.policy.device
        if self.reference_mode == "none":
            return torch.zeros((), device=device)
        if self.reference_mode == "centred":
            g = losses.implicit_reward(errors.policy, errors.reference)  # (B,) with the policy's gradient
            return losses.centred_reference_point(g, gather(g.detach()).float().mean())
        if self.reference_mode == "per_prompt":
            if groups is None:
                raise ValueError("loss.reference_point=per_prompt needs the prompt ids of the batch (groups)")
            return losses.prompt_reference_point(gather(errors.policy.detach()), gather(errors.reference.detach()),
                                                 gather(groups.to(device)), groups.to(device))
        policy, reference = ((errors.policy_mismatched, errors.reference_mismatched)
                             if self.reference_mode == "mismatched" else (errors.policy, errors.reference))
        if reference is not None:
            estimate = losses.reference_point(gather(policy.detach()), gather(reference.detach()))
            if self.reference_mode == "matched":
                return estimate
            self.running = losses.running_reference(self.running, estimate, self.decay)
        return self.running.value.to(device)

    def loss(self, errors: Errors, desirable: Tensor, gather: Gather, groups: Tensor | None = None) -> LossOutput:
        """Eq. 8 per sample, with the reference point, the implicit rewards of each class and the accuracy logged."""
        kl = self.reference_point(errors, gather, groups)
        out = losses.kto_loss(errors.policy, errors.reference, desirable, kl, beta=self.beta, utility=self.utility,
                              desirable_weight=self.weights[0], undesirable_weight=self.weights[1],
                              reference_grad=self.reference_mode == "centred")
        # diagnostics over the global batch (a local slice may lack a class)
        rewards, liked = gather(out.rewards).float(), gather(desirable)
        return LossOutput(out.losses, {
            "kl": float(kl.detach().float().mean()),
            "reward_liked": _mean(rewards[liked]),
            "reward_disliked": _mean(rewards[~liked]),
            "accuracy": out.accuracy.item(),
            "ref_err": errors.reference.mean().item(),
        })

    def state_dict(self) -> dict | None:
        """The running Q_ref as JSON numbers (float32 values round-trip exactly through a Python float)."""
        r = self.running
        return None if r is None else {"value": float(r.value), "raw": float(r.raw), "count": r.count}

    def load_state_dict(self, state: dict | None) -> None:
        """Inverse of :meth:`state_dict`; None leaves Q_ref to be estimated afresh at the next micro-step."""
        if state is None:
            self.running = None
            return
        as_tensor = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
        self.running = losses.RunningReference(value=as_tensor(state["value"]), raw=as_tensor(state["raw"]),
                                               count=int(state["count"]))


def _mean(values: Tensor) -> float:
    """The mean of a possibly empty tensor (NaN when empty: the class is absent from the batch)."""
    return values.mean().item() if values.numel() else math.nan
