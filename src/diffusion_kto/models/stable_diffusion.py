"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction) through diffusers ``from_pretrained``.

Frozen VAE and text encoder; the UNet is the policy. The reference is the same UNet with its LoRA adapters
disabled (LoRA) or a frozen copy in the compute dtype (full fine-tune) -- never a per-step weight swap."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .. import diffusion
from .base import unwrap


def _load_parts(pretrained: str, revision: str | None, variant: str | None) -> dict:
    """Load the SD components with the real diffusers / transformers ``from_pretrained`` paths."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = {"revision": revision}
    return {
        "tokenizer": CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common),
        "text_encoder": CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **common),
        "vae": AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **common),
        "unet": UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **common),
        "noise_scheduler": DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **common),
    }


class StableDiffusion:
    """SD 1.x / 2.x behind :class:`~diffusion_kto.models.base.DiffusionFamily`."""

    def __init__(
        self,
        *,
        pretrained: str,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        noise_scheduler,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        gradient_checkpointing: bool = False,
        with_reference: bool = True,
    ):
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.vae = vae.requires_grad_(False).eval().to(self.device, dtype=weight_dtype)
        self.text_encoder = text_encoder.requires_grad_(False).eval().to(self.device, dtype=weight_dtype)
        self.lora_rank = lora_rank
        self.unet = unet
        if lora_rank > 0:
            self._add_lora(lora_rank, lora_alpha, lora_dropout, lora_target_modules)
            self.ref_unet = None  # the reference is self.unet with adapters disabled
        else:  # objectives without a reference (sft, csft) keep no frozen copy
            self.ref_unet = (copy.deepcopy(unet).requires_grad_(False).eval().to(self.device, dtype=weight_dtype)
                             if with_reference else None)
            self.unet.requires_grad_(True)
            self.unet.to(self.device, dtype=torch.float32)
        self.unet.train()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    @classmethod
    def from_pretrained(cls, pretrained: str, *, revision: str | None = None, variant: str | None = None, **kw):
        """Load from a hub id or a local diffusers folder."""
        return cls(pretrained=pretrained, **_load_parts(pretrained, revision, variant), **kw)

    # ------------------------------------------------------------------------------------------ setup

    def _add_lora(self, rank: int, alpha: float | None, dropout: float, targets: tuple[str, ...]) -> None:
        """Freeze the UNet in the compute dtype and add fp32 LoRA adapters (B = 0, so policy == reference at start)."""
        from peft import LoraConfig

        self.unet.requires_grad_(False)
        self.unet.to(self.device, dtype=self.weight_dtype)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=list(targets),
        )
        self.unet.add_adapter(config)
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    @property
    def has_reference(self) -> bool:
        """Whether reference predictions are available (LoRA, or a full fine-tune loaded with its frozen copy)."""
        return self.lora_rank > 0 or self.ref_unet is not None

    def trainable_module(self) -> nn.Module:
        """The UNet (possibly wrapped by the trainer)."""
        return self.unet

    def wrap(self, prepare: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the UNet by ``prepare(unet)``; the unwrapped UNet stays reachable through :func:`unwrap`."""
        self.unet = prepare(self.unet)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA weights, or every UNet weight for a full fine-tune."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------ maths

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """CLIP text embeddings, (B, L, D), padded to the tokenizer's max length."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]  # (B, L, D)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """x0 = scaling_factor * (z - shift), z ~ q(z|image): (B, 3, H, W) -> (B, C, H/f, W/f).

        ``noise_fn(shape)`` supplies the N(0, I) draw of the reparameterised posterior sample."""
        dist = self.vae.encode(pixels.to(self.device, dtype=self.vae.dtype)).latent_dist
        eps = noise_fn(tuple(dist.mean.shape)).to(dist.mean)
        z = dist.mean + dist.std * eps
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float()

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, target) with the scheduler's forward process and prediction type."""
        noise, t = noise.to(x0), t.to(x0.device)
        return diffusion.add_noise(self.noise_scheduler, x0, noise, t), diffusion.target(self.noise_scheduler, x0, noise, t)

    def predict(self, x_t: Tensor, t: Tensor, cond: Tensor, *, reference: bool = False) -> Tensor:
        """UNet output for (x_t, t, c); the reference runs without grad."""
        if not reference:
            return self.unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
        with torch.no_grad(), self.reference_weights() as ref:
            return ref(x_t.to(self.weight_dtype), t, encoder_hidden_states=cond.to(self.weight_dtype), return_dict=False)[0]

    @contextlib.contextmanager
    def reference_weights(self) -> Iterator[nn.Module]:
        """The reference UNet: the frozen copy, or the policy with LoRA adapters disabled (restored on exit)."""
        if self.ref_unet is not None:
            yield self.ref_unet
            return
        if self.lora_rank == 0:
            raise RuntimeError("this model was loaded without a reference (with_reference=False)")
        inner = unwrap(self.unet)
        inner.disable_adapters()
        try:
            yield inner
        finally:
            inner.enable_adapters()

    # ------------------------------------------------------------------------------------------ I/O

    def trainable_state(self) -> dict[str, Tensor]:
        """LoRA weights (peft naming) or the full UNet state dict, detached on CPU."""
        inner = unwrap(self.unet)
        if self.lora_rank > 0:
            from peft.utils import get_peft_model_state_dict

            state = get_peft_model_state_dict(inner)
        else:
            state = inner.state_dict()
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Restore weights saved by :meth:`trainable_state`."""
        inner = unwrap(self.unet)
        if self.lora_rank > 0:
            from peft.utils import set_peft_model_state_dict

            result = set_peft_model_state_dict(inner, state)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"checkpoint has LoRA keys this model lacks: {unexpected[:5]}")
        else:
            inner.load_state_dict(state, strict=True)

    def export(self, out_dir: str) -> list[str]:
        """LoRA -> ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``); full -> ``unet/`` folder."""
        from diffusers import StableDiffusionPipeline

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        inner = unwrap(self.unet)
        if self.lora_rank > 0:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(inner))
            StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
            return [str(out / "pytorch_lora_weights.safetensors")]
        inner.save_pretrained(out / "unet", safe_serialization=True)
        return [str(out / "unet")]

    @contextlib.contextmanager
    def pipeline(self, *, reference: bool = False) -> Iterator:
        """A StableDiffusionPipeline (DDIM sampler) over this family's modules, policy or reference weights."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        with contextlib.ExitStack() as stack:
            unet = stack.enter_context(self.reference_weights()) if reference else unwrap(self.unet)
            yield StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                unet=unet,
                scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
