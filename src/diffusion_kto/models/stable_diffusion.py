"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction) through diffusers ``from_pretrained``.

Frozen VAE and text encoder; the UNet is the policy. The reference is the same UNet with its LoRA adapters
disabled (LoRA) or a frozen copy in the compute dtype (full fine-tune) -- never a per-step weight swap."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .. import diffusion
from .base import Conditioning, Noised, unwrap
from .loading import weight_kwargs


COMPONENTS = ("unet", "vae", "text_encoder")


@dataclasses.dataclass(frozen=True)
class TextEmbeddings(Conditioning):
    """SD 1.x / 2.x conditioning: the CLIP text encoder's last hidden states, cross-attended by the UNet."""

    hidden_states: Tensor  # (B, L, D)


def _load_parts(pretrained: str, revision: str | None, variant: str | None, components=COMPONENTS,
                allow_pickle: bool = False) -> dict:
    """Load the SD components with the real diffusers / transformers ``from_pretrained`` paths (safetensors only
    unless ``allow_pickle``).

    A component left out of ``components`` is None (a cached run needs no VAE or text encoder); the VAE's config
    (latent scaling) is always read, it is a few bytes."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = {"revision": revision}
    weights = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    parts = {name: cls.from_pretrained(pretrained, subfolder=name, variant=variant, **common,
                                       **weight_kwargs(allow_pickle)) if name in components
             else None for name, cls in weights.items()}
    return {
        **parts,
        "vae_config": dict(AutoencoderKL.load_config(pretrained, subfolder="vae", **common)),
        "tokenizer": CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common),
        "noise_scheduler": DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **common),
    }


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module.to(device, dtype)``, naming the dtype only for a real cast (diffusers warns on every dtype in ``to``)."""
    return module.to(device) if getattr(module, "dtype", None) == dtype else module.to(device, dtype=dtype)


def _frozen(module: nn.Module | None, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
    """A no-grad, eval-mode module in the compute dtype (None stays None: the component was not loaded)."""
    return None if module is None else _place(module.requires_grad_(False).eval(), device, dtype)


class StableDiffusion:
    """SD 1.x / 2.x behind :class:`~diffusion_kto.models.base.DiffusionFamily`."""

    conditioning = TextEmbeddings

    def __init__(
        self,
        *,
        pretrained: str,
        unet: nn.Module | None,
        vae: nn.Module | None,
        text_encoder: nn.Module | None,
        tokenizer,
        noise_scheduler,
        vae_config: dict | None = None,
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
        self.vae = _frozen(vae, self.device, weight_dtype)
        self.text_encoder = _frozen(text_encoder, self.device, weight_dtype)
        latent = dict(vae.config) if vae is not None else (vae_config or {})
        self.latent_scale = float(latent.get("scaling_factor", 0.18215))
        self.latent_shift = float(latent.get("shift_factor") or 0.0)
        self.lora_rank = lora_rank
        self.unet = unet
        self.ref_unet = None
        if unet is None:  # encoders only (dkto cache)
            return
        if lora_rank > 0:
            self._add_lora(lora_rank, lora_alpha, lora_dropout, lora_target_modules)
            self.ref_unet = None  # the reference is self.unet with adapters disabled
        else:  # objectives without a reference (sft, csft) keep no frozen copy
            self.ref_unet = _frozen(copy.deepcopy(unet), self.device, weight_dtype) if with_reference else None
            self.unet.requires_grad_(True)
            _place(self.unet, self.device, torch.float32)
        self.unet.train()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    @classmethod
    def from_pretrained(cls, pretrained: str, *, revision: str | None = None, variant: str | None = None,
                        components: tuple[str, ...] = COMPONENTS, allow_pickle: bool = False, **kw):
        """Load from a hub id or a local diffusers folder; ``components`` chooses which networks to load."""
        return cls(pretrained=pretrained, **_load_parts(pretrained, revision, variant, components, allow_pickle), **kw)

    # ------------------------------------------------------------------------------------------ setup

    def _add_lora(self, rank: int, alpha: float | None, dropout: float, targets: tuple[str, ...]) -> None:
        """Freeze the UNet in the compute dtype and add fp32 LoRA adapters (B = 0, so policy == reference at start)."""
        from peft import LoraConfig

        self.unet.requires_grad_(False)
        _place(self.unet, self.device, self.weight_dtype)
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

    def _require(self, name: str) -> nn.Module:
        """A loaded encoder, or a clear error when the run was set up without it (fully cached data)."""
        module = getattr(self, name)
        if module is None:
            raise RuntimeError(f"this model was loaded without its {name} (data.cache holds its outputs)")
        return module

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextEmbeddings:
        """CLIP text embeddings, (B, L, D), padded to the tokenizer's max length."""
        text_encoder = self._require("text_encoder")
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return TextEmbeddings(text_encoder(ids)[0])  # (B, L, D)

    def condition(self, text: TextEmbeddings, batch) -> TextEmbeddings:
        """SD conditions on the prompt alone."""
        return text

    def overlong_prompts(self, prompts: list[str]) -> list[str]:
        """Prompts whose tokens (with start and end tokens) exceed the tokenizer's model_max_length."""
        limit = self.tokenizer.model_max_length
        ids = self.tokenizer(list(prompts), truncation=False).input_ids
        return [p for p, tokens in zip(prompts, ids) if len(tokens) > limit]

    @torch.no_grad()
    def latent_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of the VAE posterior q(z|image): (B, 3, H, W) -> 2 x (B, C, H/f, W/f)."""
        vae = self._require("vae")
        dist = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
        return dist.mean, dist.std

    def sample_latents(self, mean: Tensor, std: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """x0 = scaling_factor * (mean + std * eps - shift): the reparameterised posterior draw, (B, C, h, w).

        ``noise_fn(shape)`` supplies eps ~ N(0, I); cached moments and fresh ones give the same x0."""
        mean, std = mean.to(self.device), std.to(self.device)
        z = mean + std * noise_fn(tuple(mean.shape)).to(mean)
        return ((z - self.latent_shift) * self.latent_scale).float()

    def encode_images(self, pixels: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """x0 of images in [-1, 1]: :meth:`latent_moments` then :meth:`sample_latents`."""
        return self.sample_latents(*self.latent_moments(pixels), noise_fn)

    def timesteps(self, seed: int, draw_ids: Tensor, stream: int) -> Tensor:
        """t ~ Uniform{0, ..., T-1} per sample (Eq. 7), each from its (seed, draw id, stream) generator: (B,) int64."""
        return diffusion.per_sample_timesteps(self.num_train_timesteps, seed, draw_ids, stream)

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Noised:
        """(x_t, target) with the scheduler's forward process and prediction type (epsilon or v)."""
        noise, t = noise.to(x0), t.to(x0.device)
        return Noised(diffusion.add_noise(self.noise_scheduler, x0, noise, t),
                      diffusion.target(self.noise_scheduler, x0, noise, t))

    def predict(self, x_t: Tensor, t: Tensor, cond: TextEmbeddings, *, reference: bool = False) -> Tensor:
        """UNet output for (x_t, t, c); the reference runs without grad."""
        if not reference:
            return self.unet(x_t, t, encoder_hidden_states=cond.hidden_states, return_dict=False)[0]
        with torch.no_grad(), self.reference_weights() as ref:
            states = cond.hidden_states.to(self.weight_dtype)
            return ref(x_t.to(self.weight_dtype), t, encoder_hidden_states=states, return_dict=False)[0]

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

    def trainable_state(self, model_state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """LoRA weights (peft naming) or the full UNet state dict, detached on CPU; from ``model_state`` (a gathered
        whole state dict of the UNet, e.g. under FSDP) when given, else from the module itself."""
        inner = unwrap(self.unet)
        state = inner.state_dict() if model_state is None else model_state
        if self.lora_rank > 0:
            from peft.utils import get_peft_model_state_dict

            state = get_peft_model_state_dict(inner, state_dict=state)
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def model_state(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`trainable_state` output keyed like the UNet's own state dict (LoRA: peft names back to module names)."""
        if self.lora_rank == 0:
            return weights
        from peft.utils import get_peft_model_state_dict

        names = [n for n, p in unwrap(self.unet).named_parameters() if p.requires_grad]
        tagged = {n: torch.tensor(i) for i, n in enumerate(names)}  # peft renames keys; the tags say which is which
        module_key = {k: names[int(v)] for k, v in get_peft_model_state_dict(unwrap(self.unet), state_dict=tagged).items()}
        return {module_key[k]: v for k, v in weights.items()}

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

    def export(self, out_dir: str, model_state: dict[str, Tensor] | None = None) -> list[str]:
        """LoRA -> ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``); full -> ``unet/`` folder.

        ``model_state``: a gathered whole state dict of the UNet (e.g. under FSDP) to export instead of the module's."""
        from diffusers import StableDiffusionPipeline

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.lora_rank > 0:
            from diffusers.utils import convert_state_dict_to_diffusers

            layers = convert_state_dict_to_diffusers(self.trainable_state(model_state))
            StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
            return [str(out / "pytorch_lora_weights.safetensors")]
        unet = unwrap(self.unet) if model_state is None else self._plain_unet(model_state)
        unet.save_pretrained(out / "unet", safe_serialization=True)
        return [str(out / "unet")]

    def _plain_unet(self, state: dict[str, Tensor]) -> nn.Module:
        """An unwrapped UNet of this architecture holding ``state`` (built on the meta device, no extra copy)."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unwrap(self.unet).config)
        unet.load_state_dict(state, strict=True, assign=True)
        return unet

    @contextlib.contextmanager
    def pipeline(self, *, reference: bool = False) -> Iterator:
        """A StableDiffusionPipeline (DDIM sampler) over this family's modules, policy or reference weights."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        vae, text_encoder = self._require("vae"), self._require("text_encoder")
        with contextlib.ExitStack() as stack:
            unet = stack.enter_context(self.reference_weights()) if reference else unwrap(self.unet)
            yield StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=self.tokenizer,
                unet=unet,
                scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
