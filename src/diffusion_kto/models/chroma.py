"""Chroma (lodestones' FLUX.1 [schnell]-derived MMDiT, no CLIP, no guidance embedding) through diffusers
``from_pretrained``.

Conditioning as ChromaPipeline builds it: T5's last hidden states, computed with the tokenizer's attention mask, and
that mask kept for the transformer, where every text token but the first padding token is masked out
(``ChromaPipeline._get_t5_prompt_embeds``); the transformer's mask is the text mask followed by ones for the image
tokens (``_prepare_attention_mask``). The modulation comes from the timestep alone (Chroma's distilled guidance
approximator), so there is no pooled vector and no guidance value. Latents, packing, position ids and the sigma shift
are FLUX.1's (:mod:`.flux`)."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Conditioning
from .flux import image_ids, pack, packed_shift, t5_tokens, unpack
from .transformer import FlowTransformerFamily


@dataclasses.dataclass(frozen=True)
class ChromaText(Conditioning):
    """Chroma conditioning: T5's states and the text mask the transformer attends with (1: attended)."""

    prompt_embeds: Tensor  # (B, L, D_t5)
    attention_mask: Tensor  # (B, L): the prompt's tokens and its first padding token


def text_mask(tokenizer_mask: Tensor) -> Tensor:
    """The transformer's text mask: ones up to and including the first padding token (the tokenizer mask's length
    plus one), zeros after, as ChromaPipeline._get_t5_prompt_embeds: (B, L) -> (B, L)."""
    lengths = tokenizer_mask.sum(dim=1, keepdim=True)  # (B, 1)
    positions = torch.arange(tokenizer_mask.shape[1], device=tokenizer_mask.device)[None]  # (1, L)
    return (positions <= lengths).to(torch.float32)


class Chroma(FlowTransformerFamily):
    """Chroma behind :class:`~diffusion_kto.models.base.DiffusionFamily` (shared body: :mod:`.transformer`)."""

    conditioning = ChromaText
    pipeline_class = "diffusers.ChromaPipeline"
    parts = {"transformer": "diffusers.ChromaTransformer2DModel", "vae": "diffusers.AutoencoderKL",
             "scheduler": "diffusers.FlowMatchEulerDiscreteScheduler",
             "text_encoder": "transformers.T5EncoderModel", "tokenizer": "transformers.T5TokenizerFast"}
    text_parts = ("text_encoder",)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.t5_tokens = t5_tokens(self.text["tokenizer"])
        step = self.vae_factor * 2
        if self.resolution % step:
            raise ConfigError(f"data.resolution: {self.resolution} is not a multiple of {step} (VAE factor x the 2x2 "
                              "packing of Chroma latents)")

    @classmethod
    def call_options(cls, pipe) -> dict:
        """ChromaPipeline keywords that sample as this family trains: the T5 context."""
        return {"max_sequence_length": t5_tokens(getattr(pipe, "tokenizer", None))}

    def default_shift(self) -> float:
        """FLUX.1's shift by the packed token count (ChromaPipeline computes the same mu)."""
        return packed_shift(self.scheduler.config, self.resolution // self.vae_factor // 2)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> ChromaText:
        """T5's last hidden states with the tokenizer's mask, and the transformer's text mask (:func:`text_mask`)."""
        t5, tokenizer = self.require("text_encoder"), self.text["tokenizer"]
        tokens = tokenizer(list(prompts), padding="max_length", max_length=self.t5_tokens, truncation=True,
                           return_tensors="pt")
        mask = tokens.attention_mask.to(self.device)
        states = t5(tokens.input_ids.to(self.device), attention_mask=mask, output_hidden_states=False)[0]
        return ChromaText(states, text_mask(mask))

    def condition(self, text: ChromaText, batch) -> ChromaText:
        """Chroma conditions on the prompt alone."""
        return text

    def overlong_prompts(self, prompts: list[str]) -> list[str]:
        """Prompts longer than the T5 context (truncated)."""
        tokenizer = self.text["tokenizer"]
        return [p for p in prompts if len(tokenizer(p, truncation=False).input_ids) > self.t5_tokens]

    def forward(self, transformer, x_t: Tensor, sigma: Tensor, cond: ChromaText) -> Tensor:
        """ChromaTransformer2DModel on packed latents at timestep sigma with the text + image attention mask:
        (B, C, h, w) -> (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
        b, _, h, w = x_t.shape
        dtype = cond.prompt_embeds.dtype
        tokens = pack(x_t)  # (B, N, 4C)
        mask = torch.cat([cond.attention_mask.to(dtype), torch.ones(b, tokens.shape[1], device=x_t.device,
                                                                    dtype=dtype)], dim=1)  # (B, L + N)
        out = transformer(hidden_states=tokens, timestep=sigma.to(x_t.dtype), encoder_hidden_states=cond.prompt_embeds,
                          txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=dtype),
                          img_ids=image_ids(h, w, x_t.device, dtype), attention_mask=mask, return_dict=False)[0]
        return unpack(out, h, w)
