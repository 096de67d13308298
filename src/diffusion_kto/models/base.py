"""The small interface every model family implements; the trainer never asks which family it has."""
from __future__ import annotations

from typing import Callable, ContextManager, Protocol

import torch
from torch import Tensor, nn


class DiffusionFamily(Protocol):
    """A text-to-image diffusion model prepared for preference fine-tuning.

    The policy is the trainable network; the reference is the frozen starting point (a disabled LoRA adapter
    or a frozen copy). Everything a family returns is on the family's device."""

    device: torch.device
    num_train_timesteps: int
    has_reference: bool  # False for objectives that need none (sft, csft with a full fine-tune)

    def trainable_module(self) -> nn.Module:
        """The module whose parameters are optimised (the UNet, possibly wrapped)."""

    def wrap(self, prepare: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the trainable module by ``prepare(module)`` (e.g. a DDP wrapper)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with requires_grad (LoRA weights or the whole UNet)."""

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Text embeddings c, (B, L, D)."""

    def overlong_prompts(self, prompts: list[str]) -> list[str]:
        """The prompts longer than the text encoder's context, which :meth:`encode_prompts` truncates."""

    def latent_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of the VAE posterior of images in [-1, 1]: (B, 3, H, W) -> 2 x (B, C, h, w) (what data.cache holds)."""

    def sample_latents(self, mean: Tensor, std: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """Scaled latents x0 = scale * (mean + std * eps - shift), (B, C, h, w); noise_fn(shape) gives eps ~ N(0, I)."""

    def encode_images(self, pixels: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """Scaled latents x0 of images in [-1, 1]: sample_latents(*latent_moments(pixels), noise_fn)."""

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, regression target) for the family's prediction type."""

    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor, *, reference: bool = False) -> Tensor:
        """The network output for (x_t, t, c), from the policy or (no grad) from the reference."""

    def trainable_state(self, model_state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """A state dict of the trainable weights, for checkpoints (from a gathered whole ``model_state`` if given)."""

    def model_state(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`trainable_state` output keyed like the trainable module's own state dict."""

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`trainable_state` output."""

    def export(self, out_dir: str, model_state: dict[str, Tensor] | None = None) -> list[str]:
        """Write the trained weights (or a gathered whole ``model_state``) in the format diffusers loads; the paths."""

    def pipeline(self, *, reference: bool = False) -> ContextManager:
        """Context manager yielding a sampling pipeline over this family's modules (policy or reference)."""


def unwrap(module: nn.Module) -> nn.Module:
    """The inner module of a DDP / compiled wrapper (an FSDP 2 module is its own inner module)."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner

