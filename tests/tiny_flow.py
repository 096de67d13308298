"""Tiny SD3 and FLUX.1 pipelines built from configs, all offline (imported by tests as `tiny_flow`): CLIP tokenizers as
in `tiny`, a T5 tokenizer built as a `tokenizers` Unigram model, random weights, saved with save_pretrained."""
from __future__ import annotations

import json
from pathlib import Path

from tiny import WORDS, write_tiny_tokenizer

TOKENS = 8  # CLIP and T5 context of the tiny pipelines
T5_DIM = 32  # T5 width = the transformers' joint attention dim


def t5_tokenizer():
    """A T5TokenizerFast whose Unigram vocabulary holds every tiny word as one piece (characters as fallback)."""
    from transformers import T5TokenizerFast

    letters = sorted({c for w in WORDS for c in w})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=TOKENS)


def _t5(tokenizer):
    """A one-layer T5 encoder of width T5_DIM."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=4, dropout_rate=0.0,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _clip(folder: Path, cls, seed: int):
    """A 2-layer CLIP text encoder of width 16 (``cls``: CLIPTextModel or CLIPTextModelWithProjection)."""
    import torch
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    return cls(CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16,
        vocab_size=len(json.loads((folder / "_tok" / "vocab.json").read_text())), max_position_embeddings=TOKENS,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def _vae(shift: float, scale: float):
    """A tiny AutoencoderKL (16x16 RGB <-> 8x8x4) with the given latent shift and scale."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=16, shift_factor=shift,
        scaling_factor=scale,
    )


def _clip_tokenizer(folder: Path):
    """The tiny CLIP tokenizer with a TOKENS context."""
    from transformers import CLIPTokenizer

    write_tiny_tokenizer(folder / "_tok")
    return CLIPTokenizer(str(folder / "_tok" / "vocab.json"), str(folder / "_tok" / "merges.txt"),
                         model_max_length=TOKENS)


def build_tiny_sd3(folder: Path, *, t5: bool = True) -> Path:
    """Save a tiny StableDiffusion3Pipeline (random weights, 16x16 images; without T5 when ``t5`` is False)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer(folder)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=8,
    )
    t5_tok = t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(0.1, 1.5),
        text_encoder=_clip(folder, CLIPTextModelWithProjection, 1), tokenizer=tokenizer,
        text_encoder_2=_clip(folder, CLIPTextModelWithProjection, 2), tokenizer_2=tokenizer,
        text_encoder_3=_t5(t5_tok) if t5 else None, tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"


def build_tiny_flux(folder: Path, *, guidance: bool = True) -> Path:
    """Save a tiny FluxPipeline (random weights, 16x16 images; [dev]-like with a guidance embedding, or [schnell]-like
    without)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer(folder)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_DIM, pooled_projection_dim=16, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    t5_tok = t5_tokenizer()
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(0.1159, 0.3611),
                        text_encoder=_clip(folder, CLIPTextModel, 1), tokenizer=tokenizer,
                        text_encoder_2=_t5(t5_tok), tokenizer_2=t5_tok)
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"


def build_tiny_chroma(folder: Path) -> Path:
    """Save a tiny ChromaPipeline (random weights, 16x16 images): ChromaTransformer2DModel with 1 double and 1 single
    block and a 1-layer guidance approximator, T5 only, the Flux VAE's shift and scale."""
    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_DIM, axes_dims_rope=(2, 2, 4), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    t5_tok = t5_tokenizer()
    pipe = ChromaPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(0.1159, 0.3611),
                          text_encoder=_t5(t5_tok), tokenizer=t5_tok)
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"


def build_tiny_z_image(folder: Path) -> Path:
    """Save a tiny ZImagePipeline (random weights, 16x16 images): ZImageTransformer2DModel with one main and one
    refiner layer of width 16, a 2-layer Qwen3 text encoder (width 16), the Flux VAE's shift and scale and Z-Image's
    fixed-shift scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    from tiny_llm import WIDTH, qwen3, qwen_tokenizer

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=1, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=WIDTH, axes_dims=[2, 2, 4], axes_lens=[64, 16, 16],
    )
    tokenizer = qwen_tokenizer()
    pipe = ZImagePipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                          vae=_vae(0.1159, 0.3611), text_encoder=qwen3(tokenizer), tokenizer=tokenizer)
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"


def build_tiny_qwen_image(folder: Path) -> Path:
    """Save a tiny QwenImagePipeline (random weights, 16x16 images): QwenImageTransformer2DModel with one block of
    width 16, a tiny Qwen2.5-VL (2 text layers, one vision block), a one-level AutoencoderKLQwenImage (16x16 RGB <->
    8x8x4, per-channel latent mean and std away from 0 / 1) and a dynamic-shifting scheduler."""
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    from tiny_llm import WIDTH, qwen25_vl, qwen_tokenizer

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=WIDTH, axes_dims_rope=(2, 2, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.2, -0.1, 0.3, 0.0], latents_std=[1.5, 0.8, 2.0, 1.2])
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift=1.0)
    tokenizer = qwen_tokenizer()
    tokenizer.model_max_length = 256  # the template's bytes and the prompt fit (the pipeline keeps up to 1024)
    pipe = QwenImagePipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=qwen25_vl(tokenizer),
                             tokenizer=tokenizer)
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"
