"""Stable Diffusion 1.x / 2.x (epsilon or v-prediction) through diffusers ``from_pretrained``.

Frozen VAE and text encoder; the UNet is the policy. The reference is the same UNet with its LoRA adapters
disabled (LoRA) or a frozen copy in the compute dtype (full fine-tune) -- never a per-step weight swap; that
machinery, the latents and the export are :class:`~.unet.UNetFamily`'s."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .base import Conditioning, frozen
from .loading import weight_kwargs
from .unet import COMPONENTS, UNetFamily, load_vae


@dataclasses.dataclass(frozen=True)
class TextEmbeddings(Conditioning):
    """SD 1.x / 2.x conditioning: the CLIP text encoder's last hidden states, cross-attended by the UNet."""

    hidden_states: Tensor  # (B, L, D)


def _load_parts(pretrained: str, revision: str | None, variant: str | None, components=COMPONENTS,
                allow_pickle: bool = False, vae: str | None = None) -> dict:
    """Load the SD components with the real diffusers / transformers ``from_pretrained`` paths (safetensors only
    unless ``allow_pickle``); ``vae``: a separate VAE (model.vae) instead of the pipeline's.

    A component left out of ``components`` is None (a cached run needs no VAE or text encoder); the VAE's config
    (latent scaling) is always read, it is a few bytes."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    common = {"revision": revision}
    load = lambda name, cls: cls.from_pretrained(  # noqa: E731
        pretrained, subfolder=name, variant=variant, **common, **weight_kwargs(allow_pickle)) if name in components else None
    unet = load("unet", UNet2DConditionModel)
    vae_module, vae_config = load_vae(pretrained, revision, variant, vae, allow_pickle, "vae" in components)
    return {
        "unet": unet,
        "vae": vae_module,
        "text_encoder": load("text_encoder", CLIPTextModel),
        "vae_config": vae_config,
        "tokenizer": CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common),
        "noise_scheduler": DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **common),
    }


class StableDiffusion(UNetFamily):
    """SD 1.x / 2.x behind :class:`~diffusion_kto.models.base.DiffusionFamily`."""

    conditioning = TextEmbeddings
    pipeline_class = "StableDiffusionPipeline"
    text_folders = ("text_encoder", "tokenizer")
    kohya_layout = "diffusers"  # kohya sd-scripts' SD 1.x / 2.x UNet has diffusers' module paths
    pipeline_kwargs = {"safety_checker": None, "requires_safety_checker": False}  # DiffusionPipeline.from_pretrained

    def __init__(self, *, text_encoder: nn.Module | None, tokenizer, **kw):
        super().__init__(**kw)
        self.tokenizer = tokenizer
        self.text_encoder = frozen(text_encoder, self.device, self.weight_dtype)

    @classmethod
    def from_pretrained(cls, pretrained: str, *, revision: str | None = None, variant: str | None = None,
                        components: tuple[str, ...] = COMPONENTS, allow_pickle: bool = False, vae: str | None = None,
                        **kw):
        """Load from a hub id or a local diffusers folder; ``components`` chooses which networks to load."""
        parts = _load_parts(pretrained, revision, variant, components, allow_pickle, vae)
        return cls(pretrained=pretrained, **parts, **kw)

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

    def unet_inputs(self, cond: TextEmbeddings, dtype: torch.dtype | None = None) -> dict:
        """The text states the UNet cross-attends to."""
        states = cond.hidden_states if dtype is None else cond.hidden_states.to(dtype)
        return {"encoder_hidden_states": states}

    def sampling_pipeline(self, unet: nn.Module):
        """A StableDiffusionPipeline (DDIM sampler) over this family's VAE, text encoder and ``unet``."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self._require("vae"),
            text_encoder=self._require("text_encoder"),
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
