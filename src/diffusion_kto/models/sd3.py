"""Stable Diffusion 3 / 3.5 (rectified flow, MMDiT) through diffusers ``from_pretrained``.

Text conditioning as StableDiffusion3Pipeline builds it: two CLIP encoders with projections (penultimate hidden
states concatenated on the feature axis, pooled outputs concatenated into the pooled projection) and T5 (its states
appended after the CLIP states, which are zero-padded to T5's width); ``model.drop_t5=true`` leaves T5 unloaded and
puts zeros in its place, as the pipeline does without ``text_encoder_3``."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Conditioning
from .transformer import FlowTransformerFamily

T5_DEFAULT_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length


def clip_states(tokenizer, encoder, prompts: list[str], device) -> tuple[Tensor, Tensor]:
    """A CLIP encoder's penultimate hidden states (B, L, D) and projected pooled output (B, P), prompts padded to the
    tokenizer's model_max_length (StableDiffusion3Pipeline._get_clip_prompt_embeds, clip_skip None)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def t5_states(tokenizer, encoder, prompts: list[str], tokens: int, width: int, device) -> Tensor:
    """T5's last hidden states (B, tokens, width), or zeros of that shape without an encoder (drop_t5)."""
    if encoder is None:
        return torch.zeros(len(prompts), tokens, width, device=device)
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokens, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids.to(device)
    return encoder(ids)[0]


def sd3_text(tokenizers, encoders, prompts: list[str], *, tokens: int, width: int, device) -> tuple[Tensor, Tensor]:
    """SD3's (prompt_embeds, pooled_prompt_embeds): [CLIP-L | CLIP-G states, zero-padded to ``width``] followed by
    T5's ``tokens`` states on the sequence axis, (B, L_clip + tokens, width); [pooled L | pooled G], (B, P)."""
    (l_states, l_pooled), (g_states, g_pooled) = (clip_states(tokenizers[i], encoders[i], prompts, device)
                                                  for i in (0, 1))
    clip = torch.cat([l_states, g_states], dim=-1)  # (B, L_clip, D_l + D_g)
    clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))  # (B, L_clip, width)
    t5 = t5_states(tokenizers[2], encoders[2], prompts, tokens, width, device).to(clip)
    return torch.cat([clip, t5], dim=-2), torch.cat([l_pooled, g_pooled], dim=-1)


def t5_tokens(tokenizer) -> int:
    """The T5 context: the pipeline's default (256), capped by the T5 tokenizer's model_max_length (the toy's 8)."""
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    return min(T5_DEFAULT_TOKENS, int(limit)) if limit else T5_DEFAULT_TOKENS


@dataclasses.dataclass(frozen=True)
class SD3Text(Conditioning):
    """SD3 conditioning: the joint-attention context and the pooled projection input."""

    prompt_embeds: Tensor  # (B, L_clip + L_t5, D): CLIP-L | CLIP-G states zero-padded to D, then T5's states
    pooled_embeds: Tensor  # (B, P): pooled CLIP-L | CLIP-G


class StableDiffusion3(FlowTransformerFamily):
    """SD3 / SD3.5 behind :class:`~diffusion_kto.models.base.DiffusionFamily` (shared body: :mod:`.transformer`)."""

    conditioning = SD3Text
    pipeline_class = "diffusers.StableDiffusion3Pipeline"
    parts = {"transformer": "diffusers.SD3Transformer2DModel", "vae": "diffusers.AutoencoderKL",
             "scheduler": "diffusers.FlowMatchEulerDiscreteScheduler",
             "text_encoder": "transformers.CLIPTextModelWithProjection", "tokenizer": "transformers.CLIPTokenizer",
             "text_encoder_2": "transformers.CLIPTextModelWithProjection", "tokenizer_2": "transformers.CLIPTokenizer",
             "text_encoder_3": "transformers.T5EncoderModel", "tokenizer_3": "transformers.T5TokenizerFast"}
    text_parts = ("text_encoder", "text_encoder_2", "text_encoder_3")
    reads = FlowTransformerFamily.reads | {"model.drop_t5"}

    def __init__(self, *, drop_t5: bool = False, **kw):
        self.drop_t5 = drop_t5
        super().__init__(**kw)
        self.t5_tokens = t5_tokens(self.text["tokenizer_3"])
        step = self.vae_factor * int(self.transformer_config.get("patch_size", 2))
        if self.resolution % step:
            raise ConfigError(f"data.resolution: {self.resolution} is not a multiple of {step} (VAE factor x patch "
                              "size of this SD3 transformer)")

    @classmethod
    def text_parts_used(cls, options: dict) -> tuple[str, ...]:
        """CLIP-L and CLIP-G, and T5 unless model.drop_t5."""
        return cls.text_parts[:2] if options.get("drop_t5") else cls.text_parts

    @classmethod
    def options(cls, cfg) -> dict:
        """flow.*, data.resolution and model.drop_t5."""
        return {**super().options(cfg), "drop_t5": cfg.model.drop_t5}

    @classmethod
    def check(cls, cfg, pretrained: str, index: dict) -> None:
        """T5 must be in the pipeline unless model.drop_t5=true."""
        super().check(cfg, pretrained, index)
        if not cfg.model.drop_t5 and not any(index.get("text_encoder_3") or ()):
            raise ConfigError(f"model.drop_t5: {cfg.model.pretrained!r} has no T5 encoder (text_encoder_3); set "
                              "model.drop_t5=true to train with zeros in T5's place, as the pipeline samples without it")

    @classmethod
    def call_options(cls, pipe) -> dict:
        """StableDiffusion3Pipeline keywords that sample as this family trains: the T5 context."""
        return {"max_sequence_length": t5_tokens(getattr(pipe, "tokenizer_3", None))}

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> SD3Text:
        """SD3's text conditioning (:func:`sd3_text`); T5 zeros when model.drop_t5."""
        names = ("tokenizer", "tokenizer_2", "tokenizer_3")
        encoders = [self.require(n) for n in self.text_parts[:2]] + [None if self.drop_t5 else self.require(
            "text_encoder_3")]
        embeds, pooled = sd3_text([self.text[n] for n in names], encoders, prompts, tokens=self.t5_tokens,
                                  width=int(self.transformer_config["joint_attention_dim"]), device=self.device)
        return SD3Text(embeds, pooled)

    def condition(self, text: SD3Text, batch) -> SD3Text:
        """SD3 conditions on the prompt alone."""
        return text

    def overlong_prompts(self, prompts: list[str]) -> list[str]:
        """Prompts longer than the CLIP context (77; their CLIP states and pooled vector are truncated) or, with T5,
        than the T5 context."""
        clip = self.text["tokenizer"]
        limits = [(clip, clip.model_max_length)] + ([] if self.drop_t5 else [(self.text["tokenizer_3"], self.t5_tokens)])
        return [p for p in prompts if any(len(tok(p, truncation=False).input_ids) > n for tok, n in limits)]

    def forward(self, transformer, x_t: Tensor, sigma: Tensor, cond: SD3Text) -> Tensor:
        """SD3Transformer2DModel at timestep 1000 sigma (the pipeline's scheduler timesteps): (B, C, h, w)."""
        return transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=cond.prompt_embeds,
                           pooled_projections=cond.pooled_embeds, return_dict=False)[0]
