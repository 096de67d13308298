"""Qwen-Image (Alibaba's 20B MMDiT with a Qwen2.5-VL text encoder and a video VAE) through diffusers ``from_pretrained``.

Conditioning as QwenImagePipeline builds it (``_get_qwen_prompt_embeds``): the prompt inside the pipeline's system +
user template, through Qwen2.5-VL; the last hidden state of the real tokens with the template's first 34 tokens
dropped, padded with zeros to the batch's longest and masked (``encoder_hidden_states_mask``). Each prompt's features
are kept here padded to the text context with their mask, and cut to the batch's longest in :meth:`QwenImage.forward`,
so the transformer sees exactly the pipeline's sequence. The VAE (``AutoencoderKLQwenImage``) encodes one-frame videos;
its latents are normalised per channel, x0 = (z - latents_mean) / latents_std, then packed in 2x2 patches as FLUX.1's
with ``img_shapes`` (1, h/2, w/2). Time sigma, the velocity eps - x0, and FLUX.1's packed-token shift."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Conditioning
from .flux import pack, packed_shift, unpack
from .transformer import FlowTransformerFamily

# QwenImagePipeline.__init__: its prompt template, the template tokens dropped and the longest prompt kept
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROP = 34
DEFAULT_TOKENS = 1024


@dataclasses.dataclass(frozen=True)
class QwenImageText(Conditioning):
    """Qwen-Image conditioning: Qwen2.5-VL's last hidden states of the prompt (template dropped) and their mask."""

    prompt_embeds: Tensor  # (B, L, D_qwen): zeros past each prompt's tokens
    prompt_mask: Tensor  # (B, L) int64: 1 for the prompt's tokens


def context(tokenizer) -> int:
    """The text context: the pipeline's 1024 tokens after the template, within the tokenizer's model_max_length."""
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    return min(DEFAULT_TOKENS, int(limit) - DROP) if limit else DEFAULT_TOKENS


class QwenImage(FlowTransformerFamily):
    """Qwen-Image behind :class:`~diffusion_kto.models.base.DiffusionFamily` (shared body: :mod:`.transformer`)."""

    conditioning = QwenImageText
    pipeline_class = "diffusers.QwenImagePipeline"
    kohya_layout = "diffusers"  # lora_unet_ + diffusers' module path: diffusers' Qwen-Image loader maps it back
    parts = {"transformer": "diffusers.QwenImageTransformer2DModel", "vae": "diffusers.AutoencoderKLQwenImage",
             "scheduler": "diffusers.FlowMatchEulerDiscreteScheduler",
             "text_encoder": "transformers.Qwen2_5_VLForConditionalGeneration",
             "tokenizer": "transformers.Qwen2Tokenizer"}
    text_parts = ("text_encoder",)

    def __init__(self, **kw):
        super().__init__(**kw)
        vae = kw["parts"]["vae_config"]
        self.latents_mean = torch.tensor(vae["latents_mean"], dtype=torch.float32)  # (C,)
        self.latents_std = torch.tensor(vae["latents_std"], dtype=torch.float32)  # (C,)
        self.tokens = context(self.text["tokenizer"])
        if self.transformer_config.get("guidance_embeds"):
            raise ConfigError(f"model.pretrained: {self.pretrained!r} has a guidance embedding, which the published "
                              "Qwen-Image models do not; a guidance-distilled Qwen-Image is not supported")
        if self.resolution % (self.vae_factor * 2):
            raise ConfigError(f"data.resolution: {self.resolution} is not a multiple of {self.vae_factor * 2} (VAE "
                              "factor x the 2x2 packing of Qwen-Image latents)")

    @classmethod
    def latent_factor(cls, vae_config: dict) -> int:
        """2 per temporal-downsampling level of the video VAE (QwenImagePipeline's vae_scale_factor)."""
        return 2 ** len(vae_config["temperal_downsample"])

    @classmethod
    def call_options(cls, pipe) -> dict:
        """QwenImagePipeline samples as this family trains with its own defaults."""
        return {}

    def default_shift(self) -> float:
        """exp(mu) of the (h/2)(w/2) packed tokens, as QwenImagePipeline (or the scheduler's fixed shift)."""
        return packed_shift(self.scheduler.config, self.resolution // self.vae_factor // 2)

    @torch.no_grad()
    def latent_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of the video VAE's posterior of one-frame videos: (B, 3, H, W) -> 2 x (B, C, H/f, W/f)."""
        vae = self.require("vae")
        dist = vae.encode(pixels.to(self.device, dtype=vae.dtype).unsqueeze(2)).latent_dist  # (B, C, 1, h, w)
        return dist.mean.squeeze(2), dist.std.squeeze(2)

    def sample_latents(self, mean: Tensor, std: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """x0 = (mean + std * eps - latents_mean) / latents_std per channel, (B, C, h, w) (the pipeline's inverse)."""
        mean, std = mean.to(self.device), std.to(self.device)
        z = (mean + std * noise_fn(tuple(mean.shape)).to(mean)).float()
        shape = (1, -1, 1, 1)
        return (z - self.latents_mean.to(z.device).view(shape)) / self.latents_std.to(z.device).view(shape)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> QwenImageText:
        """Qwen2.5-VL's last hidden states of the templated prompts, the first DROP tokens dropped, each padded to
        the context: (B, L, D), (B, L)."""
        encoder, tokenizer = self.require("text_encoder"), self.text["tokenizer"]
        tokens = tokenizer([TEMPLATE.format(p) for p in prompts], max_length=self.tokens + DROP, padding=True,
                           truncation=True, return_tensors="pt").to(self.device)
        states = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         output_hidden_states=True).hidden_states[-1]
        kept = [s[m.bool()][DROP:] for s, m in zip(states, tokens.attention_mask)]  # B x (L_i, D)
        embeds = states.new_zeros(len(prompts), self.tokens, states.shape[-1])
        mask = torch.zeros(len(prompts), self.tokens, dtype=torch.long, device=self.device)
        for i, k in enumerate(kept):
            embeds[i, : len(k)], mask[i, : len(k)] = k, 1
        return QwenImageText(embeds, mask)

    def condition(self, text: QwenImageText, batch) -> QwenImageText:
        """Qwen-Image conditions on the prompt alone."""
        return text

    def overlong_prompts(self, prompts: list[str]) -> list[str]:
        """Prompts whose tokens after the template pass the context (truncated)."""
        tokenizer = self.text["tokenizer"]
        return [p for p in prompts if len(tokenizer(TEMPLATE.format(p), truncation=False).input_ids) - DROP
                > self.tokens]

    def forward(self, transformer, x_t: Tensor, sigma: Tensor, cond: QwenImageText) -> Tensor:
        """QwenImageTransformer2DModel on packed latents at time sigma, the text cut to the batch's longest prompt:
        (B, C, h, w) -> (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
        b, _, h, w = x_t.shape
        longest = max(int(cond.prompt_mask.sum(1).max()), 1)
        out = transformer(hidden_states=pack(x_t), timestep=sigma.to(x_t.dtype),
                          encoder_hidden_states=cond.prompt_embeds[:, :longest],
                          encoder_hidden_states_mask=cond.prompt_mask[:, :longest],
                          img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack(out, h, w)
