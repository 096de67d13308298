"""Z-Image (Tongyi-MAI's single-stream DiT with a Qwen3 text encoder) through diffusers ``from_pretrained``.

Conditioning as ZImagePipeline builds it (``_encode_prompt``): the prompt as a one-turn chat (the tokenizer's chat
template, generation prompt, thinking on), padded to the text context, through Qwen3; the second-to-last hidden state
of each prompt's real tokens is the caption feature the transformer takes, one variable-length tensor per sample
(here padded to the context, with the mask that cuts it back). The transformer sees each latent as a one-frame video
(C, 1, h, w) and the time 1 - sigma, and predicts x0 - eps: the pipeline steps with its negation, the velocity
v = eps - x0 this project regresses, so :meth:`ZImage.forward` returns the negation too. The Flux VAE's shift and
scale, and FLUX.1's shift by the 2x2 token count (``calculate_shift``; a scheduler without dynamic shifting keeps its
fixed one)."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Conditioning
from .flux import packed_shift
from .transformer import FlowTransformerFamily

DEFAULT_TOKENS = 512  # ZImagePipeline's max_sequence_length


@dataclasses.dataclass(frozen=True)
class ZImageText(Conditioning):
    """Z-Image conditioning: Qwen3's second-to-last hidden states, padded, and the mask of the real tokens."""

    prompt_embeds: Tensor  # (B, L, D_qwen): zeros past each prompt's tokens
    prompt_mask: Tensor  # (B, L) bool: the chat-formatted prompt's tokens


def context(tokenizer) -> int:
    """The text context: the pipeline's default (512), capped by the tokenizer's model_max_length."""
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    return min(DEFAULT_TOKENS, int(limit)) if limit else DEFAULT_TOKENS


def chat(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as ZImagePipeline formats it: a user turn, the generation prompt, thinking enabled."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=True) for p in prompts]


class ZImage(FlowTransformerFamily):
    """Z-Image behind :class:`~diffusion_kto.models.base.DiffusionFamily` (shared body: :mod:`.transformer`)."""

    conditioning = ZImageText
    pipeline_class = "diffusers.ZImagePipeline"
    kohya_layout = "diffusers"  # lora_unet_ + diffusers' module path: diffusers' Z-Image loader maps it back
    parts = {"transformer": "diffusers.ZImageTransformer2DModel", "vae": "diffusers.AutoencoderKL",
             "scheduler": "diffusers.FlowMatchEulerDiscreteScheduler",
             "text_encoder": "transformers.Qwen3Model", "tokenizer": "transformers.AutoTokenizer"}
    text_parts = ("text_encoder",)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.tokens = context(self.text["tokenizer"])
        patch = int(self.transformer_config.get("all_patch_size", (2,))[0])
        self.patch = patch
        if self.resolution % (self.vae_factor * patch):
            raise ConfigError(f"data.resolution: {self.resolution} is not a multiple of {self.vae_factor * patch} "
                              "(VAE factor x the patch size of this Z-Image transformer)")

    @classmethod
    def call_options(cls, pipe) -> dict:
        """ZImagePipeline keywords that sample as this family trains: the text context."""
        return {"max_sequence_length": context(getattr(pipe, "tokenizer", None))}

    def default_shift(self) -> float:
        """exp(mu) of the (h/2)(w/2) image tokens, as ZImagePipeline (or the scheduler's fixed shift)."""
        return packed_shift(self.scheduler.config, self.resolution // self.vae_factor // 2)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> ZImageText:
        """Qwen3's hidden_states[-2] of the chat-formatted prompts, zeroed past their tokens: (B, L, D), (B, L)."""
        encoder, tokenizer = self.require("text_encoder"), self.text["tokenizer"]
        tokens = tokenizer(chat(tokenizer, list(prompts)), padding="max_length", max_length=self.tokens,
                           truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(self.device).bool()
        states = encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask,
                         output_hidden_states=True).hidden_states[-2]
        return ZImageText(states * mask[..., None], mask)

    def condition(self, text: ZImageText, batch) -> ZImageText:
        """Z-Image conditions on the prompt alone."""
        return text

    def overlong_prompts(self, prompts: list[str]) -> list[str]:
        """Prompts whose chat-formatted tokens pass the text context (truncated)."""
        tokenizer = self.text["tokenizer"]
        return [p for p, c in zip(prompts, chat(tokenizer, list(prompts)))
                if len(tokenizer(c, truncation=False).input_ids) > self.tokens]

    def forward(self, transformer, x_t: Tensor, sigma: Tensor, cond: ZImageText) -> Tensor:
        """ZImageTransformer2DModel on one-frame latents at time 1 - sigma, each sample's caption cut to its tokens;
        the negated output, v = eps - x0: (B, C, h, w) -> B x (C, 1, h, w) -> (B, C, h, w)."""
        frames = list(x_t.unsqueeze(2).unbind(0))  # B x (C, 1, h, w)
        captions = [e[m] for e, m in zip(cond.prompt_embeds, cond.prompt_mask.bool())]  # B x (L_i, D)
        out = transformer(frames, (1 - sigma).to(x_t.dtype), captions, return_dict=False)[0]
        return -torch.stack([o.to(x_t.dtype) for o in out]).squeeze(2)
