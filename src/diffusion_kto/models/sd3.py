"""Stable Diffusion 3 / 3.5 (rectified flow, MMDiT) through diffusers ``from_pretrained``.

Text conditioning as StableDiffusion3Pipeline builds it: two CLIP encoders with projections (penultimate hidden
states concatenated on the feature axis, pooled outputs concatenated into the pooled projection) and T5 (its states
appended after the CLIP states, which are zero-padded to T5's width); ``model.drop_t5=true`` leaves T5 unloaded and
puts zeros in its place, as the pipeline does without ``text_encoder_3``."""
from __future__ import annotations

import torch
from torch import Tensor

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
