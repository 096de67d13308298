"""SD3.5-medium-sized and FLUX.1-dev-sized step time and peak memory on a GPU, with random weights: LoRA KTO
(matched, mismatched, amortized) beside LoRA SFT and Flow-DPO, bf16, 1024 px, batch 1.

No download: the transformer, VAE, CLIP and T5 encoders are built from the published config values of
stabilityai/stable-diffusion-3.5-medium and black-forest-labs/FLUX.1-dev (below) with random weights, in bf16, and
saved as a diffusers folder with offline tokenizers (prompts are padded to the full CLIP / T5 context either way, so
the sequence lengths are the real ones: SD3 77 + 256 tokens, Flux 512). Step time and memory do not depend on the
weights' values. Then `dkto bench step`'s own code runs on that folder (`bench_step`, per-step medians and peak memory
of every mode in fresh processes). One family per call; a folder is reused when it is already there.

    python benchmarks/flow_gpu.py --family flux --out flux-b1.json                  (sft, kto_matched, dpo at batch 1)
    python benchmarks/flow_gpu.py --family flux --batch-size 2 --losses sft,kto_mismatched,kto_amortized \
        --out flux-b2.json                                                          (mismatched pairs need 2 samples)
    python benchmarks/flow_gpu.py --family sd3 ...                                  (the same for SD3.5-medium)
    python benchmarks/flow_gpu.py --family sd3 --tiny --out tiny.json    (a CPU smoke run on shrunken configs)

KTO's mismatched reference point (and its amortized form) rolls prompts within the batch, so it cannot run at batch 1
(the trainer refuses it); it is timed at batch 2 against SFT at batch 2. DPO's batch of 1 is one pair (2 images).

Disk: FLUX.1-dev-sized 33 GB in bf16 (transformer 24, T5 9.5), SD3.5-medium-sized 16 GB; delete a folder before the
other family's run on a 64 GB disk.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

# published config values (transformer/, vae/, text_encoder*/ config.json of the two hub repos)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
VAE_16CH = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}  # scaling_factor, shift_factor
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0)


def shrink(config: dict, tiny: bool, **small) -> dict:
    """The config itself, or with ``small`` values for a CPU smoke run."""
    return {**config, **small} if tiny else config


def tokenizers(t5_tokens: int):
    """Offline tokenizers: the shipped toy CLIP tokenizer (77 tokens) and a Unigram T5 tokenizer (t5_tokens)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    from diffusion_kto.models import resolve_pretrained

    clip = CLIPTokenizer.from_pretrained(Path(resolve_pretrained("toy")) / "tokenizer", model_max_length=77)
    words = ["a", "red", "green", "blue", "circle", "square", "triangle", "photo", "of"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -1.0) for w in words]
    return clip, T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=t5_tokens)


def text_encoders(family: str, tiny: bool) -> dict:
    """CLIP-L (+ CLIP-G for SD3) and T5-XXL with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    t5 = T5EncoderModel(T5Config(**shrink(T5_XXL, tiny, d_model=64, d_ff=64, d_kv=16, num_heads=4, num_layers=1)))
    if family == "flux":
        return {"text_encoder": CLIPTextModel(CLIPTextConfig(**shrink(CLIP_L, tiny, **small))), "text_encoder_2": t5}
    clip_g = shrink(CLIP_G, tiny, **{**small, "projection_dim": 32})
    return {"text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**shrink(CLIP_L, tiny, **small))),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**clip_g)), "text_encoder_3": t5}


def build_folder(family: str, out: Path, tiny: bool) -> Path:
    """Save a random-weight SD3.5-medium- or FLUX.1-dev-shaped pipeline in bf16 (skipped when it is there)."""
    import diffusers

    if (out / "model_index.json").is_file():
        return out
    scale, shift = VAE_FACTORS[family]
    small_vae = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        vae = diffusers.AutoencoderKL(**shrink(VAE_16CH, tiny, **small_vae), scaling_factor=scale, shift_factor=shift)
        if family == "flux":
            transformer = diffusers.FluxTransformer2DModel(**shrink(
                FLUX_DEV, tiny, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)))
        else:
            transformer = diffusers.SD3Transformer2DModel(**shrink(
                SD35_MEDIUM, tiny, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                caption_projection_dim=16, pooled_projection_dim=64, dual_attention_layers=(0,)))
        encoders = text_encoders(family, tiny)
    clip, t5 = tokenizers(512 if family == "flux" else 256)
    if family == "flux":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                              max_shift=1.15, base_image_seq_len=256,
                                                              max_image_seq_len=4096)
        pipe = diffusers.FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=clip,
                                      tokenizer_2=t5, **encoders)
    else:
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            tokenizer=clip, tokenizer_2=clip, tokenizer_3=t5, **encoders)
    pipe.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


def main() -> int:
    """Build (or reuse) one family's folder, run `bench_step` on it, print and write the JSON."""
    from diffusion_kto.apps.bench_step import BenchSettings, bench_step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=("sd3", "flux"), required=True)
    p.add_argument("--model-dir", default=None, help="default: /tmp/<family>-random (or -tiny)")
    p.add_argument("--tiny", action="store_true", help="shrunken configs at 64 px, for a CPU smoke run")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--losses", default="sft,kto_matched,dpo", help="comma-separated bench step modes (sft required)")
    p.add_argument("--checkpointing", action="store_true", help="train.gradient_checkpointing=true in every mode")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    start = time.perf_counter()
    default_dir = f"/tmp/{args.family}-{'tiny' if args.tiny else 'random'}"
    folder = build_folder(args.family, Path(args.model_dir or default_dir), args.tiny)
    built = time.perf_counter() - start
    settings = BenchSettings(model=str(folder), batch_size=args.batch_size,
                             resolution=64 if args.tiny else args.resolution, adapters=("lora",), lora_rank=16,
                             steps=args.steps, warmup=args.warmup, memory_steps=2, mixed_precision="bf16",
                             losses=tuple(args.losses.split(",")),
                             overrides=("train.gradient_checkpointing=true",) if args.checkpointing else ())
    report = bench_step(replace(settings), progress=lambda line: print(line, file=sys.stderr, flush=True))
    report.update(model=f"{'FLUX.1-dev' if args.family == 'flux' else 'SD3.5-medium'}-shaped, random weights, bf16"
                        + (" (tiny)" if args.tiny else ""), batch_size=args.batch_size,
                  device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  torch=torch.__version__, build_s=round(built, 1), seconds=round(time.perf_counter() - start, 1))
    text = json.dumps(report, indent=1)
    Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
