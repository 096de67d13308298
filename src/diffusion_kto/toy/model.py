"""The tiny Stable Diffusion pipeline of the toy world, built from configs (no model hub).

Standard diffusers layout, so the toy goes through exactly the code path of SD 1.5:
32x32 RGB <-> AutoencoderKL (factor 2) <-> 16x16x4 latents, a ~1.7M-parameter UNet2DConditionModel
cross-attending to a 2-layer CLIPTextModel (hidden size 32), a CLIPTokenizer whose vocabulary is the toy
grammar's words, and a DDIM scheduler (1000 training steps, epsilon prediction, SD's scaled-linear betas).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusion_kto.toy import world

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_TOKENS = 16  # "a magenta triangle on black" is 5 words + BOS + EOS
TEXT_DIM = 32  # hidden size of the text encoder = the UNet's cross-attention dim
LATENT_CHANNELS = 4


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Split a word into BPE symbols the way CLIP does: characters, the last one suffixed with </w>, then the
    lowest-ranked adjacent pair merged until none applies."""
    symbols = [*word[:-1], word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that turn every word into a single token. A word that the existing merges leave split gets new
    merges appended (lowest priority), which never change how earlier words split."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(symbols := _bpe(word, ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def tokenizer_vocab(words: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id: single characters (bare and with </w>), every merge result, then BOS and EOS."""
    letters = sorted({ch for w in words for ch in w})
    tokens = letters + [ch + END_OF_WORD for ch in letters] + [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer_files(folder: str | Path, words: list[str] | None = None) -> Path:
    """Write CLIP's vocab.json and merges.txt for the toy vocabulary (every word one token) into folder.
    Also kept beside tokenizer.json in saved pipelines, for transformers 4.x's slow CLIPTokenizer."""
    words = world.vocabulary() if words is None else words
    merges = bpe_merges(words)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer_vocab(words, merges), indent=0) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return folder


def build_tokenizer(words: list[str] | None = None, max_tokens: int = MAX_TOKENS) -> CLIPTokenizer:
    """A CLIPTokenizer over the toy vocabulary (context ``max_tokens``), loaded from freshly written vocab.json +
    merges.txt."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tokenizer_files(tmp, words)
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_tokens, pad_token=EOS)


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer, 2-head CLIP text transformer with hidden size TEXT_DIM over the tokenizer's vocabulary."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


INITIAL_LOGVAR = -6.0  # posterior log-variance at initialisation


def build_vae() -> AutoencoderKL:
    """A two-block AutoencoderKL: 32x32x3 pixels <-> 16x16x4 latents (one downsampling).

    The posterior log-variance starts at INITIAL_LOGVAR instead of 0: with the tiny KL weight of SD-style
    training, unit posterior noise would otherwise drown the latents for most of a short CPU run."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=world.SIZE,
        mid_block_add_attention=False,
        scaling_factor=1.0,  # set after VAE training to 1 / std of the corpus latents
    )
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:] = INITIAL_LOGVAR  # posterior moments: mean (4), then logvar (4)
    return vae


def build_unet() -> UNet2DConditionModel:
    """A ~1.7M-parameter conditional UNet on 16x16x4 latents, cross-attending to TEXT_DIM text states at the
    8x8 and 4x4 levels (attention at 16x16 would triple the CPU cost for little gain on centred shapes)."""
    return UNet2DConditionModel(
        sample_size=world.SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_scheduler() -> DDIMScheduler:
    """SD 1.x's noise schedule (1000 steps, scaled-linear betas, epsilon prediction) with DDIM sampling."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A freshly initialised (untrained) toy pipeline; weights drawn from torch's generator seeded with seed."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    return StableDiffusionPipeline(
        vae=build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: StableDiffusionPipeline, out_dir: str | Path) -> Path:
    """save_pretrained in safetensors, plus the tokenizer's vocab.json and merges.txt."""
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    write_tokenizer_files(out / "tokenizer")
    return out
