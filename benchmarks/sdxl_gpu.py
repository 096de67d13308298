"""SDXL-sized LoRA step time and peak memory on a GPU, with random weights: KTO (matched, mismatched, amortized)
against SFT and Diffusion-DPO at 1024 px, bf16, gradient checkpointing (what sdxl-kto-lora.yaml trains with).

No download: SDXL base 1.0's UNet (2.6 B weights), VAE and both text encoders are built from their published configs
(``benchmarks/sdxl_configs.json``) with random weights and saved as a diffusers StableDiffusionXLPipeline folder, with
the shipped toy tokenizer padded to the 77-token context (step time and memory depend on shapes, not on weights or
token ids). Then ``dkto bench step``'s own code (:func:`diffusion_kto.apps.bench_step.bench_step`) runs on that
folder: every mode in fresh subprocesses, medians of the timed steps, ``torch.cuda.max_memory_allocated`` from a
separate run per mode; DPO takes half as many pairs as the others take images (same images per step).

    python benchmarks/sdxl_gpu.py --out sdxl-gpu.json                 (the GPU run; about 10 minutes on an H200)
    python benchmarks/sdxl_gpu.py --tiny --resolution 64 --out x.json (a CPU smoke run of the same code, tiny shapes)

Targets (issue 16): LoRA KTO peak memory <= 1.05 x LoRA SFT's; amortized KTO step time <= 1.5 x SFT's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sd15_gpu import write_report  # noqa: E402

CONFIGS = json.loads((Path(__file__).parent / "sdxl_configs.json").read_text())
LOSSES = ("sft", "kto_matched", "kto_mismatched", "kto_amortized", "dpo")


def shrink(configs: dict) -> dict:
    """SDXL's layout at toy widths (2 blocks, 64 px), for checking this script on a CPU."""
    unet = {**configs["unet"], "block_out_channels": [32, 64], "attention_head_dim": [2, 4],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "transformer_layers_per_block": [1, 1],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "cross_attention_dim": 64,
            "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32, "sample_size": 8}
    vae = {**configs["vae"], "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8, "layers_per_block": 1,
           "sample_size": 64}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return {**configs, "unet": unet, "vae": vae, "text_encoder": {**configs["text_encoder"], **text},
            "text_encoder_2": {**configs["text_encoder_2"], **text, "projection_dim": 32}}


def build_folder(out: Path, configs: dict) -> Path:
    """Save a random-weight SDXL-shaped StableDiffusionXLPipeline to ``out`` (skipped when it is already there)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from diffusion_kto.models import resolve_pretrained

    if (out / "model_index.json").is_file():
        return out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    tokenizer = CLIPTokenizer.from_pretrained(Path(resolve_pretrained("toy")) / "tokenizer", model_max_length=77)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler(**configs["scheduler"]), add_watermarker=False)
    pipe.save_pretrained(out)
    return out


def main() -> int:
    """Build (or reuse) the folder, run bench step on it, print and write the JSON."""
    from diffusion_kto.apps.bench_step import BenchSettings, bench_step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="/tmp/sdxl-random")
    p.add_argument("--tiny", action="store_true", help="SDXL's layout at toy widths (a CPU check of this script)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2, help="images per step (sdxl-kto-lora.yaml's)")
    p.add_argument("--lora-rank", type=int, default=16, help="sdxl-kto-lora.yaml's")
    p.add_argument("--mixed-precision", default="bf16", choices=("no", "fp16", "bf16"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    start = time.perf_counter()
    folder = build_folder(Path(args.model_dir), shrink(CONFIGS) if args.tiny else CONFIGS)
    built = time.perf_counter() - start
    settings = BenchSettings(model=str(folder), batch_size=args.batch_size, resolution=args.resolution,
                             adapters=("lora",), losses=LOSSES, lora_rank=args.lora_rank, steps=args.steps,
                             warmup=args.warmup, memory_steps=2, mixed_precision=args.mixed_precision, official=(),
                             overrides=("train.gradient_checkpointing=true",))
    report = bench_step(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    write_report(report, "SDXL-shaped, random weights" + (" (tiny)" if args.tiny else ""), built, start, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
