"""What an objective is: what it needs from the data and the forward pass, and its loss on typed errors.

There is one object per ``loss.name`` (the registry is :data:`diffusion_kto.objectives.OBJECTIVES`). An objective
imports no model, accelerator or config module: the trainer asks it what to compute (:meth:`Objective.plan`), hands
it the :class:`Errors` of the forward pass and a ``gather`` function (a tensor of this process -> the tensor of
every process, concatenated), and reduces the per-sample losses it returns. Configs are read by attribute only.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

Gather = Callable[[Tensor], Tensor]  # (n,) on this process -> (n * processes,) over all of them


@dataclass(frozen=True)
class Outputs:
    """The raw network outputs behind the errors (for objectives on predictions, not only errors: DiffusionNFT), in
    the family's own parameterisation (epsilon, v or flow velocity) and shape."""

    policy: Tensor  # (B, ...) with gradient
    target: Tensor  # (B, ...) the regression target the errors measure against
    reference: Tensor | None = None  # (B, ...) no gradient; None when the plan asks no reference
    weight: Tensor | None = None  # (B,) the family's per-sample weight of the errors, None when it has none


@dataclass(frozen=True)
class Errors:
    """Per-sample denoising errors of one micro-batch (paper Eq. 7): ||prediction - target||^2 of the policy and of
    the frozen reference on the same x_t, t, noise and prompt. -log pi is the error up to constants, so the implicit
    reward is g = reference - policy."""

    policy: Tensor  # (B,) with gradient
    reference: Tensor | None = None  # (B,) no gradient; None when the objective needs no reference
    # the first n samples with their prompts rolled by one within the batch (unrelated pairs, paper §4.1); no gradient
    policy_mismatched: Tensor | None = None  # (n,)
    reference_mismatched: Tensor | None = None  # (n,)
    outputs: Outputs | None = None  # the predictions themselves, when the plan asks for them
    draws: Tensor | None = None  # (B,) int64 draw ids: samples with the same id were noised with the same noise and t


def class_mean(values: Tensor) -> float:
    """The mean of a possibly empty tensor, for a log (NaN when empty: the class is absent from the batch)."""
    return values.float().mean().item() if values.numel() else math.nan


def prompt_groups(prompts: Sequence[str]) -> Tensor:
    """An int64 id per prompt, the same for the same text on every process (the first 7 bytes of its SHA-1): (B,)."""
    return torch.tensor([int.from_bytes(hashlib.sha1(p.encode()).digest()[:7], "big") for p in prompts],
                        dtype=torch.int64)


@dataclass(frozen=True)
class ForwardPlan:
    """Which errors the forward pass computes for one micro-step."""

    reference: bool = False  # the reference's errors on the batch
    mismatched: int = 0  # n > 0: policy and reference errors of the first n samples on prompts rolled by one
    outputs: bool = False  # also hand over the raw predictions, target and weight (Errors.outputs)


@dataclass
class LossOutput:
    """Per-sample (or per-pair) losses, not reduced, and detached diagnostics for the log."""

    losses: Tensor  # (B,) or (P,)
    metrics: dict[str, float] = field(default_factory=dict)


class Objective:
    """The base of every objective: the defaults of an objective that trains on liked and disliked rows as given."""

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = False  # the frozen reference (adapters off, or a copy) must be loaded
    needs_both_classes: ClassVar[bool] = True  # the feedback must hold liked and disliked rows
    paired: ClassVar[bool] = False  # batches are pairs: all preferred images first, then their rejected partners
    # the share of each global batch drawn as same-prompt (liked, disliked) pairs on one shared draw (data/sampler.py)
    pair_share: float = 0.0

    # what trains this objective on one class, for the refusal of one-class feedback ("" when nothing does)
    one_class_setting: ClassVar[str] = ""

    @classmethod
    def needs_both(cls, gamma: float) -> bool:
        """Whether the feedback must hold liked and disliked rows when liked rows are drawn with probability gamma."""
        return cls.needs_both_classes

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Refuse settings this objective cannot train with (raises ConfigError naming the key); nothing by default."""

    @classmethod
    def from_config(cls, cfg: Any) -> Objective:
        """The objective of a validated run config (read by attribute: loss.*, data.*, train.*)."""
        return cls()

    def liked_share(self, gamma: float) -> float:
        """The probability of drawing a liked row (paper §4.2: gamma = data.desirable_ratio)."""
        return gamma

    def condition(self, prompt: str, desirable: bool) -> str:
        """The prompt the model is trained on for a row with this label (the prompt itself by default)."""
        return prompt

    def sampling_prompt(self, prompt: str) -> str:
        """The prompt a trained model is sampled with for ``prompt`` (the prompt itself by default)."""
        return prompt

    def prompts_used(self, prompts: Sequence[str]) -> list[str]:
        """Every distinct prompt the text encoder sees in training, for rows with these prompts (the cache's list)."""
        return list(dict.fromkeys(prompts))

    def plan(self, micro_step: int, batch_size: int) -> ForwardPlan:
        """What the forward pass computes at micro-step ``micro_step`` (the policy's errors only by default)."""
        return ForwardPlan()

    def loss(self, errors: Errors, desirable: Tensor, gather: Gather, groups: Tensor | None = None) -> LossOutput:
        """Per-sample losses and diagnostics of one micro-batch; ``desirable``: (B,) bool; ``groups``: (B,) int64 prompt
        ids (:func:`prompt_groups` of the batch's prompts), for objectives that compare samples of one prompt."""
        raise NotImplementedError

    def state_dict(self) -> dict | None:
        """State that a resumed run must restore (JSON numbers), None when the objective keeps none."""
        return None

    def load_state_dict(self, state: dict | None) -> None:
        """Restore :meth:`state_dict` output (None: nothing kept)."""
