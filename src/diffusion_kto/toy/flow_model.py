"""The tiny flow-matching pipeline of the toy world: Stable Diffusion 3 format, built from configs (no model hub).

The same layout as SD3 / SD3.5, so the toy goes through exactly the code path of the real models: the SD toy's
trained AutoencoderKL (32x32 RGB <-> 16x16x4 latents; its shift and scale re-measured on the corpus), an
SD3Transformer2DModel on 2x2 patches (64 image tokens) with joint attention, two CLIP text encoders with projections
(hidden size 32 each; their penultimate states are concatenated, their pooled outputs give the pooled projection)
over the toy CLIPTokenizer, a tiny T5 encoder (d_model 64 = the joint attention dim) over a Unigram T5 tokenizer
whose model_max_length (8) is the T5 context, and a FlowMatchEulerDiscreteScheduler (shift 1: 64 tokens need none).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from diffusion_kto.toy import model, world

T5_DIM = 64  # = the transformer's joint_attention_dim; the CLIP states (2 x 32) are zero-padded to it
TOKENS = 8  # the CLIP and the T5 context (tokenizers' model_max_length): "a magenta triangle on black" + BOS + EOS
POOLED_DIM = 2 * model.TEXT_DIM  # the two CLIP projections, concatenated
HIDDEN, HEADS = 96, 3  # transformer width (3 heads of 32): about the SD toy UNet's cost per image at 16 text tokens
LAYERS = 6


def build_t5_tokenizer(words: list[str] | None = None) -> T5TokenizerFast:
    """A Unigram T5 tokenizer in which every grammar word (with its leading word-boundary mark) is one piece;
    unknown words fall back to characters, then <unk>."""
    words = world.vocabulary() if words is None else words
    letters = sorted({c for w in words for c in w})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=TOKENS)


def build_t5(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    """A 2-layer T5 encoder (d_model T5_DIM, 4 heads of 16) over the tokenizer's vocabulary."""
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=16, d_ff=2 * T5_DIM, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=TOKENS, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    ))


def build_clip(tokenizer) -> CLIPTextModelWithProjection:
    """The toy CLIP text transformer (model.build_text_encoder's recipe) with a TEXT_DIM projection of its pooled
    output, as SD3's CLIP-L and CLIP-G have."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=model.TEXT_DIM, intermediate_size=4 * model.TEXT_DIM,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TOKENS,
        projection_dim=model.TEXT_DIM, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def build_transformer() -> SD3Transformer2DModel:
    """An SD3 MMDiT on 16x16x4 latents: 2x2 patches (64 tokens), LAYERS joint blocks of width HIDDEN, RMS q/k norm
    (as SD3.5)."""
    return SD3Transformer2DModel(
        sample_size=world.SIZE // 2, patch_size=2, in_channels=model.LATENT_CHANNELS,
        out_channels=model.LATENT_CHANNELS, num_layers=LAYERS, attention_head_dim=HIDDEN // HEADS,
        num_attention_heads=HEADS,
        joint_attention_dim=T5_DIM, caption_projection_dim=HIDDEN, pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=world.SIZE // 2, qk_norm="rms_norm",
    )


def build_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """SD3's sampler (Euler on the rectified flow, 1000 training timesteps) with the given shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def load_sd_vae() -> AutoencoderKL:
    """The shipped SD toy's trained VAE (no second VAE is trained)."""
    from diffusion_kto.toy import weights_dir

    return AutoencoderKL.from_pretrained(weights_dir(), subfolder="vae", use_safetensors=True)


def build_pipeline(seed: int = 0, vae: AutoencoderKL | None = None) -> StableDiffusion3Pipeline:
    """A freshly initialised toy SD3 pipeline around ``vae`` (default: the SD toy's); weights from seed."""
    torch.manual_seed(seed)
    clip_tokenizer = model.build_tokenizer(max_tokens=TOKENS)
    t5_tokenizer = build_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=build_transformer(), scheduler=build_scheduler(), vae=vae if vae is not None else load_sd_vae(),
        text_encoder=build_clip(clip_tokenizer), tokenizer=clip_tokenizer,
        text_encoder_2=build_clip(clip_tokenizer), tokenizer_2=model.build_tokenizer(max_tokens=TOKENS),
        text_encoder_3=build_t5(t5_tokenizer), tokenizer_3=t5_tokenizer,
    )


def save_pipeline(pipe: StableDiffusion3Pipeline, out_dir: str | Path) -> Path:
    """save_pretrained in safetensors, plus the CLIP tokenizers' vocab.json and merges.txt; tokenizer_3 is listed as
    T5TokenizerFast (as in the SD3 releases): transformers 5 names its one T5 tokenizer T5Tokenizer, which transformers
    4 would read as the sentencepiece one, which has no file here."""
    import json

    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        model.write_tokenizer_files(out / name)
    index = json.loads((out / "model_index.json").read_text())
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
