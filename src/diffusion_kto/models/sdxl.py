"""Stable Diffusion XL, the base model (no refiner stage; epsilon or v-prediction) through diffusers ``from_pretrained``.

Conditioning (Podell et al., arXiv 2307.01952, §2.1-2.2): the penultimate hidden states of both text encoders
(CLIP ViT-L and OpenCLIP ViT-bigG), concatenated along the feature axis, cross-attended by the UNet; the pooled
projection of the second; and the micro-conditioning "time ids" of each image -- its original size, the top-left of
its crop and the target size -- which the data transform records for the crop it actually makes.

Caption dropout: SDXL was trained with zeroed text embeddings as its unconditional input, and its pipeline samples
with zeros for an empty negative prompt (``force_zeros_for_empty_prompt``); so an empty prompt is encoded as zeros,
both states and pooled, when the pipeline's config says so (the SDXL base does). The frozen VAE runs in the compute
dtype, except under fp16 with a VAE whose config asks for fp32 (``force_upcast``: the SDXL VAE overflows in fp16;
an fp16-safe VAE given as ``model.vae`` runs in fp16)."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from .base import Conditioning, frozen
from .loading import weight_kwargs
from .unet import COMPONENTS, UNetFamily, load_vae


@dataclasses.dataclass(frozen=True)
class SDXLConditioning(Conditioning):
    """SDXL's conditioning. The text part (what ``dkto cache`` stores per prompt) is the states and the pooled
    embedding; the time ids belong to the images and are added per batch (:meth:`StableDiffusionXL.condition`)."""

    hidden_states: Tensor  # (B, L, D1 + D2): penultimate states of text_encoder and text_encoder_2, concatenated
    pooled: Tensor  # (B, P): text_encoder_2's pooled projection
    time_ids: Tensor | None = None  # (B, 6) int64: original (h, w), crop (top, left), target (h, w) of each image

    def mismatched(self) -> SDXLConditioning:
        """The prompts rolled by one within the batch (paper §4.1); each image keeps its own time ids."""
        return dataclasses.replace(self, hidden_states=self.hidden_states.roll(1, dims=0),
                                   pooled=self.pooled.roll(1, dims=0))


def _load_parts(pretrained: str, revision: str | None, variant: str | None, components=COMPONENTS,
                allow_pickle: bool = False, vae: str | None = None) -> dict:
    """The SDXL components through diffusers / transformers ``from_pretrained`` (safetensors only unless
    ``allow_pickle``); the "text_encoder" role loads both encoders. ``vae``: a separate VAE (model.vae)."""
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    common = {"revision": revision}
    load = lambda name, cls, role: cls.from_pretrained(  # noqa: E731
        pretrained, subfolder=name, variant=variant, **common, **weight_kwargs(allow_pickle)) if role in components else None
    unet = load("unet", UNet2DConditionModel, "unet")
    vae_module, vae_config = load_vae(pretrained, revision, variant, vae, allow_pickle, "vae" in components)
    return {
        "unet": unet,
        "vae": vae_module,
        "vae_config": vae_config,
        "text_encoder": load("text_encoder", CLIPTextModel, "text_encoder"),
        "text_encoder_2": load("text_encoder_2", CLIPTextModelWithProjection, "text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common),
        "tokenizer_2": CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **common),
        "noise_scheduler": DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **common),
        "zero_empty_prompt": bool(DiffusionPipeline.load_config(pretrained, **common).get(
            "force_zeros_for_empty_prompt", True)),
    }


class StableDiffusionXL(UNetFamily):
    """SDXL (base) behind :class:`~diffusion_kto.models.base.DiffusionFamily`."""

    conditioning = SDXLConditioning
    pipeline_class = "StableDiffusionXLPipeline"
    text_folders = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    kohya_layout = "sgm"  # kohya sd-scripts trains SDXL on the original (LDM) UNet and names modules after it
    pipeline_kwargs = {"add_watermarker": False}  # DiffusionPipeline.from_pretrained: images as the model makes them

    def __init__(self, *, text_encoder: nn.Module | None, text_encoder_2: nn.Module | None, tokenizer, tokenizer_2,
                 zero_empty_prompt: bool = True, **kw):
        super().__init__(**kw)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = frozen(text_encoder, self.device, self.weight_dtype)
        self.text_encoder_2 = frozen(text_encoder_2, self.device, self.weight_dtype)
        self.zero_empty_prompt = zero_empty_prompt

    @classmethod
    def from_pretrained(cls, pretrained: str, *, revision: str | None = None, variant: str | None = None,
                        components: tuple[str, ...] = COMPONENTS, allow_pickle: bool = False, vae: str | None = None,
                        **kw):
        """Load from a hub id or a local diffusers folder; ``components`` chooses which networks to load."""
        parts = _load_parts(pretrained, revision, variant, components, allow_pickle, vae)
        return cls(pretrained=pretrained, **parts, **kw)

    def vae_dtype(self, vae_config: dict, weight_dtype: torch.dtype) -> torch.dtype:
        """fp32 for a VAE that asks for it (``force_upcast``) under fp16, as the SDXL pipeline decodes; else the
        compute dtype."""
        if weight_dtype == torch.float16 and vae_config.get("force_upcast", True):
            return torch.float32
        return weight_dtype

    # ------------------------------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> SDXLConditioning:
        """Penultimate states of both encoders concatenated, (B, 77, D1 + D2), and text_encoder_2's pooled projection
        (B, P); zeros for an empty prompt when the pipeline samples its unconditional branch with zeros."""
        encoders = ((self.tokenizer, self._require("text_encoder")), (self.tokenizer_2, self._require("text_encoder_2")))
        states = []
        for tokenizer, encoder in encoders:
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (B, L, D_i)
        hidden = torch.cat(states, dim=-1)  # (B, L, D1 + D2)
        pooled = out.text_embeds  # (B, P): the projection of the last encoder, text_encoder_2
        if self.zero_empty_prompt:
            keep = torch.tensor([p != "" for p in prompts], device=hidden.device)
            hidden = torch.where(keep[:, None, None], hidden, torch.zeros_like(hidden))
            pooled = torch.where(keep[:, None], pooled, torch.zeros_like(pooled))
        return SDXLConditioning(hidden, pooled)

    def condition(self, text: SDXLConditioning, batch) -> SDXLConditioning:
        """The prompts' conditioning plus each image's time ids: original (h, w), crop (top, left), target (h, w)."""
        if batch.original_size is None or batch.crop is None:
            raise ValueError("SDXL conditions on each image's original size and crop, and this batch has none")
        time_ids = torch.cat([batch.original_size, batch.crop], dim=1)  # (B, 2 + 4)
        return dataclasses.replace(text, time_ids=time_ids.to(self.device))

    def overlong_prompts(self, prompts: list[str]) -> list[str]:
        """Prompts longer than either tokenizer's context (with start and end tokens)."""
        too_long = set()
        for tokenizer in (self.tokenizer, self.tokenizer_2):
            ids = tokenizer(list(prompts), truncation=False).input_ids
            too_long |= {p for p, tokens in zip(prompts, ids) if len(tokens) > tokenizer.model_max_length}
        return [p for p in prompts if p in too_long]

    def unet_inputs(self, cond: SDXLConditioning, dtype: torch.dtype | None = None) -> dict:
        """Cross-attended states, and the added conditioning: pooled text embedding and time ids (integers: their
        sinusoidal embedding is computed in fp32 by the UNet, so sizes above 2048 stay exact in any dtype)."""
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))  # noqa: E731
        return {"encoder_hidden_states": cast(cond.hidden_states),
                "added_cond_kwargs": {"text_embeds": cast(cond.pooled), "time_ids": cond.time_ids}}

    def sampling_pipeline(self, unet: nn.Module):
        """A StableDiffusionXLPipeline (DDIM sampler) over this family's VAE, both text encoders and ``unet``."""
        from diffusers import DDIMScheduler, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=self._require("vae"),
            text_encoder=self._require("text_encoder"),
            text_encoder_2=self._require("text_encoder_2"),
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=unet,
            scheduler=DDIMScheduler.from_config(self.noise_scheduler.config),
            force_zeros_for_empty_prompt=self.zero_empty_prompt,
            add_watermarker=False,
        )
