"""The small interface every model family implements; the trainer never asks which family it has.

A family owns its conditioning (:class:`Conditioning`: SD's text states, SDXL's pooled embeddings and time ids,
...), its timestep law (discrete t for DDPM-trained UNets, sigma in [0, 1] for flow matching) and its regression
target (epsilon, v, or a velocity); :mod:`diffusion_kto.forward` turns them into per-sample errors."""
from __future__ import annotations

import dataclasses
from typing import Callable, ContextManager, NamedTuple, Protocol, Sequence, TypeVar

import torch
from torch import Tensor, nn

C = TypeVar("C", bound="Conditioning")


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """A family's conditioning of a batch: named tensor fields, each with the batch as its first dim (B, ...).

    Subclasses are frozen dataclasses whose fields are tensors (or None for an absent part). The text part is what
    `dkto cache` stores per prompt (:meth:`tensors` / :meth:`from_tensors`)."""

    def _map(self: C, fn: Callable[[Tensor], Tensor]) -> C:
        """The same conditioning with ``fn`` applied to every tensor field."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: fn(v) for k, v in values.items() if v is not None})

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are set, by name."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_tensors(cls: type[C], tensors: dict[str, Tensor]) -> C:
        """Inverse of :meth:`tensors`."""
        return cls(**tensors)

    @classmethod
    def cat(cls: type[C], parts: Sequence[C]) -> C:
        """The batches of ``parts`` one after another, field by field."""
        names = parts[0].tensors()
        return dataclasses.replace(parts[0], **{k: torch.cat([p.tensors()[k] for p in parts]) for k in names})

    def to(self: C, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> C:
        """Moved to ``device``; floating-point fields cast to ``dtype`` (integer ids keep theirs)."""
        return self._map(lambda t: t.to(device, dtype=dtype if dtype is not None and t.is_floating_point() else None))

    def __getitem__(self: C, index) -> C:
        """The rows ``index`` (a slice or an index tensor) of every field."""
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        """The batch size."""
        return len(next(iter(self.tensors().values())))

    def mismatched(self: C) -> C:
        """The conditioning with its prompts rolled by one within the batch: unrelated (image, prompt) pairs for the
        mismatched reference point (paper §4.1). Families whose conditioning has per-image parts keep those."""
        return self._map(lambda t: t.roll(1, dims=0))


class Noised(NamedTuple):
    """A noised batch and what the network must predict for it."""

    x_t: Tensor  # (B, C, h, w)
    target: Tensor  # (B, C, h, w): epsilon, v or the flow velocity
    weight: Tensor | None = None  # (B,) per-sample error weights (flow-matching loss weightings); None = 1


class DiffusionFamily(Protocol):
    """A text-to-image diffusion model prepared for preference fine-tuning.

    The policy is the trainable network; the reference is the frozen starting point (a disabled LoRA adapter
    or a frozen copy). Everything a family returns is on the family's device."""

    device: torch.device
    weight_dtype: torch.dtype
    has_reference: bool  # False for objectives that need none (sft, csft with a full fine-tune)
    conditioning: type[Conditioning]  # the family's conditioning class (rebuilt from cached tensors)
    # class attributes read before a model loads (models.family_of gives the class):
    reads: frozenset[str]  # the family-specific config keys it honours (models.FAMILY_KEYS: flow, model.vae, ...)
    pipeline_kwargs: dict  # extra DiffusionPipeline.from_pretrained keywords for sampling (dkto sample, eval)
    # and the class methods network_config(pretrained, revision) -> dict (the trained network's config, no weights)
    # and lora_source(alpha, network_config) -> lora_formats.LoraSource, for dkto export
    # and text_components(options) -> the pipeline folders a text cache is keyed by (text encoders and tokenizers)
    # and options(cfg) -> family-specific loading keywords, check(cfg, pretrained, index) -> None (its own refusals),
    # sampler(scheduler) -> the scheduler it samples with, call_options(pipe) -> extra keywords of pipe(...)

    def trainable_module(self) -> nn.Module:
        """The module whose parameters are optimised (the UNet or transformer, possibly wrapped)."""

    def wrap(self, prepare: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the trainable module by ``prepare(module)`` (e.g. a DDP wrapper)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with requires_grad (LoRA weights or the whole network)."""

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The text conditioning of a batch of prompts (no gradient); what `dkto cache` stores per prompt."""

    def condition(self, text: Conditioning, batch) -> Conditioning:
        """The whole conditioning of a :class:`~diffusion_kto.data.Batch`: its prompts' text conditioning (encoded or
        cached) plus any per-image parts the family conditions on (e.g. SDXL's size and crop time ids)."""

    def overlong_prompts(self, prompts: list[str]) -> list[str]:
        """The prompts longer than the text encoder's context, which :meth:`encode_prompts` truncates."""

    def latent_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of the VAE posterior of images in [-1, 1]: (B, 3, H, W) -> 2 x (B, C, h, w) (what data.cache holds)."""

    def sample_latents(self, mean: Tensor, std: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """Scaled latents x0 = scale * (mean + std * eps - shift), (B, C, h, w); noise_fn(shape) gives eps ~ N(0, I)."""

    def encode_images(self, pixels: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """Scaled latents x0 of images in [-1, 1]: sample_latents(*latent_moments(pixels), noise_fn)."""

    def timesteps(self, seed: int, draw_ids: Tensor, stream: int) -> Tensor:
        """Each sample's timestep from its own (seed, draw id, stream) generator: (B,) (discrete t or sigma)."""

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Noised:
        """x_t, the regression target and per-sample weights for the family's forward process."""

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning, *, reference: bool = False) -> Tensor:
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


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module.to(device, dtype)``, naming the dtype only for a real cast (diffusers warns on every dtype in ``to``)."""
    return module.to(device) if getattr(module, "dtype", None) == dtype else module.to(device, dtype=dtype)


def frozen(module: nn.Module | None, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
    """A no-grad, eval-mode module in the compute dtype (None stays None: the component was not loaded)."""
    return None if module is None else place(module.requires_grad_(False).eval(), device, dtype)


def add_lora(network: nn.Module, device: torch.device, dtype: torch.dtype, rank: int, alpha: float | None,
             dropout: float, targets: Sequence[str], *, cast: bool = True) -> None:
    """Freeze ``network`` in the compute dtype (``cast=False``: only moved, for quantized weights) and add fp32 LoRA
    adapters on ``targets`` (B = 0, so the policy starts as the reference); ConfigError when ``targets`` match no
    layer."""
    from peft import LoraConfig

    from ..config import ConfigError

    network.requires_grad_(False)
    place(network, device, dtype) if cast else network.to(device)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        init_lora_weights="gaussian", target_modules=list(targets))
    try:
        network.add_adapter(config)
    except ValueError as err:
        raise ConfigError(f"lora.target_modules: {list(targets)} match no layer of this {type(network).__name__} "
                          f"({str(err).splitlines()[0][:160]})") from None
    for p in network.parameters():
        if p.requires_grad:
            p.data = p.data.float()
