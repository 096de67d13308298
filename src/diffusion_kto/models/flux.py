"""FLUX.1 [dev] and [schnell] (rectified flow, MMDiT with single-stream blocks) through diffusers ``from_pretrained``.

Conditioning as FluxPipeline builds it: CLIP's pooled output and T5's hidden states (T5 is required: the transformer
cross-attends to nothing else). The transformer sees packed latents, 2x2 patches flattened into tokens
(B, C, h, w) -> (B, h/2 * w/2, 4C), with position ids (0, row, column) for the image tokens and zeros for the text
tokens; [dev]'s guidance embedding gets ``model.guidance_scale``. Sigma is shifted by the image's token count
(Flux's resolution-dependent shift, :func:`diffusion_kto.flow.resolution_shift`)."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .. import flow
from ..errors import ConfigError
from .base import Conditioning
from .transformer import FlowTransformerFamily, import_class

T5_DEFAULT_TOKENS = 512  # FluxPipeline's max_sequence_length ([schnell] was trained with 256: lower the tokenizer's)
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's guidance_scale, and diffusers' Flux LoRA training default


@dataclasses.dataclass(frozen=True)
class FluxText(Conditioning):
    """Flux conditioning: T5's states (joint attention) and CLIP's pooled output (the modulation vector)."""

    prompt_embeds: Tensor  # (B, L_t5, D_t5)
    pooled_embeds: Tensor  # (B, D_clip)


def t5_tokens(tokenizer) -> int:
    """The T5 context: the pipeline's default (512), capped by the T5 tokenizer's model_max_length."""
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    return min(T5_DEFAULT_TOKENS, int(limit)) if limit else T5_DEFAULT_TOKENS


def packed_shift(config, side: int) -> float:
    """exp(mu), mu linear in the image's token count side^2 (2x2-packed latents) between the scheduler's base and max
    shift (FluxPipeline's calculate_shift); the scheduler's fixed shift when it does not shift dynamically."""
    if not config.get("use_dynamic_shifting"):
        return float(config.get("shift", 1.0))
    return flow.resolution_shift(side * side, base_seq_len=config.get("base_image_seq_len", 256),
                                 max_seq_len=config.get("max_image_seq_len", 4096),
                                 base_shift=config.get("base_shift", 0.5), max_shift=config.get("max_shift", 1.15))


def pack(latents: Tensor) -> Tensor:
    """2x2 patches as tokens: (B, C, h, w) -> (B, h/2 * w/2, 4C), channel-major within a patch (FluxPipeline)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """Position ids (0, row, column) of the packed image tokens: (h/2 * w/2, 3)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class Flux(FlowTransformerFamily):
    """FLUX.1 behind :class:`~diffusion_kto.models.base.DiffusionFamily` (shared body: :mod:`.transformer`)."""

    conditioning = FluxText
    pipeline_class = "diffusers.FluxPipeline"
    kohya_layout = "bfl"  # kohya / ComfyUI FLUX.1 LoRAs name Black Forest Labs' modules (flux_kohya.py)
    parts = {"transformer": "diffusers.FluxTransformer2DModel", "vae": "diffusers.AutoencoderKL",
             "scheduler": "diffusers.FlowMatchEulerDiscreteScheduler",
             "text_encoder": "transformers.CLIPTextModel", "tokenizer": "transformers.CLIPTokenizer",
             "text_encoder_2": "transformers.T5EncoderModel", "tokenizer_2": "transformers.T5TokenizerFast"}
    text_parts = ("text_encoder", "text_encoder_2")
    reads = FlowTransformerFamily.reads | {"model.guidance_scale"}

    def __init__(self, *, guidance_scale: float | None = None, **kw):
        super().__init__(**kw)
        self.guidance = self.transformer_config.get("guidance_embeds", False)
        self.guidance_scale = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
        self.t5_tokens = t5_tokens(self.text["tokenizer_2"])
        step = self.vae_factor * 2
        if self.resolution % step:
            raise ConfigError(f"data.resolution: {self.resolution} is not a multiple of {step} (VAE factor x the 2x2 "
                              "packing of Flux latents)")

    @classmethod
    def options(cls, cfg) -> dict:
        """flow.*, data.resolution and model.guidance_scale."""
        return {**super().options(cfg), "guidance_scale": cfg.model.guidance_scale}

    @classmethod
    def check(cls, cfg, pretrained: str, index: dict) -> None:
        """T5 cannot be dropped; a guidance value needs a guidance embedding ([dev], not [schnell])."""
        super().check(cfg, pretrained, index)
        if cfg.model.drop_t5:
            raise ConfigError("model.drop_t5: FLUX.1 needs T5, its only per-token text conditioning (CLIP gives a "
                              "pooled vector); cache the T5 embeddings instead (dkto cache, then data.cache)")
        if cfg.model.guidance_scale is None:
            return
        network = import_class(cls.parts["transformer"])
        config = network.load_config(pretrained, subfolder="transformer", revision=cfg.model.revision)
        if not config.get("guidance_embeds"):
            raise ConfigError(f"model.guidance_scale: {cfg.model.pretrained!r} has no guidance embedding (FLUX.1 "
                              "[schnell] is timestep-distilled without one); leave model.guidance_scale unset")

    @classmethod
    def call_options(cls, pipe) -> dict:
        """FluxPipeline keywords that sample as this family trains: the T5 context."""
        return {"max_sequence_length": t5_tokens(getattr(pipe, "tokenizer_2", None))}

    def default_shift(self) -> float:
        """Flux's packed-token shift (:func:`packed_shift`)."""
        return packed_shift(self.scheduler.config, self.resolution // self.vae_factor // 2)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> FluxText:
        """T5's last hidden states (B, L, D) and CLIP's pooled output (B, D_clip), as FluxPipeline.encode_prompt."""
        clip, tokenizer = self.require("text_encoder"), self.text["tokenizer"]
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        t5, t5_tokenizer = self.require("text_encoder_2"), self.text["tokenizer_2"]
        ids = t5_tokenizer(list(prompts), padding="max_length", max_length=self.t5_tokens, truncation=True,
                           return_tensors="pt").input_ids.to(self.device)
        return FluxText(t5(ids, output_hidden_states=False)[0], pooled)

    def condition(self, text: FluxText, batch) -> FluxText:
        """Flux conditions on the prompt alone (its position ids depend only on shapes)."""
        return text

    def overlong_prompts(self, prompts: list[str]) -> list[str]:
        """Prompts longer than the T5 context (truncated; CLIP's pooled vector also truncates at its 77 tokens)."""
        tokenizer = self.text["tokenizer_2"]
        return [p for p in prompts if len(tokenizer(p, truncation=False).input_ids) > self.t5_tokens]

    def forward(self, transformer, x_t: Tensor, sigma: Tensor, cond: FluxText) -> Tensor:
        """FluxTransformer2DModel on packed latents at timestep sigma, guidance model.guidance_scale ([dev]):
        (B, C, h, w) -> (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
        b, _, h, w = x_t.shape
        dtype = cond.prompt_embeds.dtype
        guidance = torch.full((b,), self.guidance_scale, device=x_t.device) if self.guidance else None
        out = transformer(hidden_states=pack(x_t), timestep=sigma.to(x_t.dtype), guidance=guidance,
                          pooled_projections=cond.pooled_embeds, encoder_hidden_states=cond.prompt_embeds,
                          txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=dtype),
                          img_ids=image_ids(h, w, x_t.device, dtype), return_dict=False)[0]
        return unpack(out, h, w)
