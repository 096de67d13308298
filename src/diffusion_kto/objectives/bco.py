"""Binary Classifier Optimization (Jung et al. 2024, arXiv 2404.04656) as an objective: a logistic classifier on the
implicit reward beta*g, liked against disliked, shifted by a running reward shift delta (docs/method.md)."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .. import losses
from .base import Errors, ForwardPlan, Gather, LossOutput, Objective, class_mean

SHIFTS = ("balanced", "pooled")  # loss.reward_shift: midpoint of the class means (default), or TRL's mean of all


class BCO(Objective):
    """loss_i = -log sigma(s_i (beta g_i - delta)), s = +1 liked / -1 disliked, delta the running reward shift
    (gathered over processes, folded in before use, kept in checkpoints)."""

    name = "bco"
    needs_reference = True

    def __init__(self, beta: float, shift: str = "balanced"):
        if shift not in SHIFTS:
            raise ValueError(f"unknown reward shift {shift!r}; expected one of {', '.join(SHIFTS)}")
        self.beta, self.shift = beta, shift
        self.stats = losses.RewardShift()  # running sums and counts of the rewards of each class

    @classmethod
    def from_config(cls, cfg: Any) -> BCO:
        """loss.beta (the same scale of g as KTO's) and loss.reward_shift of a run config."""
        return cls(cfg.loss.beta, cfg.loss.reward_shift)

    def plan(self, micro_step: int, batch_size: int) -> ForwardPlan:
        """The reference's errors on the batch."""
        return ForwardPlan(reference=True)

    def delta(self) -> float:
        """The current reward shift (0 before any batch)."""
        return losses.reward_shift_value(self.stats, self.shift)

    def loss(self, errors: Errors, desirable: Tensor, gather: Gather, groups: Tensor | None = None) -> LossOutput:
        """Fold the global batch's rewards into delta, then the per-sample losses; delta, the rewards of each class
        and the classifier's accuracy logged."""
        rewards = (self.beta * losses.implicit_reward(errors.policy.detach(), errors.reference)).float()  # (B,)
        liked = gather(desirable.to(rewards.device)).bool()  # (N,)
        everyone = gather(rewards)  # (N,)
        self.stats = losses.update_reward_shift(self.stats, everyone, liked)
        delta = self.delta()
        out = losses.bco_loss(errors.policy, errors.reference, desirable, delta, beta=self.beta)
        return LossOutput(out.losses, {
            "delta": delta, "reward_liked": class_mean(everyone[liked]), "reward_disliked": class_mean(everyone[~liked]),
            "accuracy": float(gather(out.margins).gt(0).float().mean()), "ref_err": errors.reference.mean().item(),
        })

    def state_dict(self) -> dict | None:
        """The running sums and counts (Python floats and ints: exact through JSON); None before any batch."""
        s = self.stats
        return None if s.liked_count + s.disliked_count == 0 else dict(s._asdict())

    def load_state_dict(self, state: dict | None) -> None:
        """Inverse of :meth:`state_dict`; None starts delta afresh."""
        if state is None:
            self.stats = losses.RewardShift()
            return
        self.stats = losses.RewardShift(liked_sum=float(state["liked_sum"]), liked_count=int(state["liked_count"]),
                                        disliked_sum=float(state["disliked_sum"]),
                                        disliked_count=int(state["disliked_count"]))
