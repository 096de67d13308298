"""The paper's supervised baselines (§5) as objectives: SFT on liked images, and CSFT conditioned on the label."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .. import losses
from .base import Errors, Gather, LossOutput, Objective

CSFT_PHRASE = {True: "good image", False: "bad image"}


def csft_prompt(prompt: str, desirable: bool = True, position: str = "prefix") -> str:
    """The CSFT conditioning: "good image, <prompt>" for liked rows (and at sampling time), "bad image, ..." else;
    with ``position="suffix"``: "<prompt>, good image"."""
    phrase = CSFT_PHRASE[bool(desirable)]
    return f"{phrase}, {prompt}" if position == "prefix" else f"{prompt}, {phrase}"


class SFT(Objective):
    """Supervised fine-tuning: the denoising loss on liked images only, which are all it draws."""

    name = "sft"
    needs_both_classes = False

    def liked_share(self, gamma: float) -> float:
        """Only liked rows are drawn."""
        return 1.0

    def loss(self, errors: Errors, desirable: Tensor, gather: Gather, groups: Tensor | None = None) -> LossOutput:
        """policy_err on liked samples, 0 on disliked ones."""
        return LossOutput(losses.sft_loss(errors.policy, desirable).losses)


class CSFT(Objective):
    """Conditional SFT (after HPS v1): the denoising loss on both classes, the prompt carrying the label."""

    name = "csft"

    def __init__(self, position: str = "prefix"):
        self.position = position  # where the quality phrase goes: "prefix" (paper) or "suffix"

    @classmethod
    def from_config(cls, cfg: Any) -> CSFT:
        """loss.csft_position of a run config."""
        return cls(cfg.loss.csft_position)

    def condition(self, prompt: str, desirable: bool) -> str:
        """ "good image, <prompt>" / "bad image, <prompt>" (or the suffix form)."""
        return csft_prompt(prompt, desirable, self.position)

    def sampling_prompt(self, prompt: str) -> str:
        """Sampled with the "good image" phrase."""
        return csft_prompt(prompt, True, self.position)

    def prompts_used(self, prompts: Sequence[str]) -> list[str]:
        """Both phrasings of every prompt."""
        return list(dict.fromkeys(self.condition(p, d) for p in prompts for d in (True, False)))

    def loss(self, errors: Errors, desirable: Tensor, gather: Gather, groups: Tensor | None = None) -> LossOutput:
        """policy_err of every sample."""
        return LossOutput(errors.policy)
