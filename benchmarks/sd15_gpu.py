"""SD 1.5-sized step time and memory on a GPU, with random weights: ours beside the official script's step design.

No download: SD 1.5's UNet, VAE and CLIP text encoder are built from their published configs
(:func:`sd15_flops.sd15_parts`) with random weights and saved as a diffusers folder, with the shipped toy tokenizer
(prompts are padded to the 77-token context either way). Step time and memory do not depend on the weights' values.
Then `dkto bench step`'s own code runs on that folder: ``e2e`` = whole `dkto train` runs, ours (uncached, cached) and
the official design, full and LoRA (`bench_end_to_end`); ``step`` = per-step medians and peak memory of sft and kto
(matched, mismatched, amortized), full and LoRA (`bench_step`).

    python benchmarks/sd15_gpu.py --part e2e --out e2e.json [--mixed-precision fp16] [--steps 10] [--warmup 3]
    python benchmarks/sd15_gpu.py --part step --out step.json [--adapters full,lora]
    python benchmarks/sd15_gpu.py --tiny ...      (a CPU smoke run of the same code on a 2-block UNet at 64 px)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sd15_flops import sd15_parts  # noqa: E402


def tiny_parts():
    """A 2-block SD-shaped UNet / VAE / text encoder (64 px), for checking this script on a CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                        norm_num_groups=8, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=77, vocab_size=49408))
    return unet, vae, text


def build_folder(out: Path, tiny: bool) -> Path:
    """Save a random-weight SD 1.5-shaped StableDiffusionPipeline to ``out`` (skipped when it is already there)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from diffusion_kto.models import resolve_pretrained

    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    unet, vae, text = tiny_parts() if tiny else sd15_parts("cuda" if torch.cuda.is_available() else "cpu")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    tokenizer = CLIPTokenizer.from_pretrained(Path(resolve_pretrained("toy")) / "tokenizer", model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def main() -> int:
    """Build (or reuse) the folder, run one part, print and write its JSON."""
    from diffusion_kto.apps.bench_step import BenchSettings, bench_end_to_end, bench_step

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("e2e", "step"), required=True)
    p.add_argument("--model-dir", default="/tmp/sd15-random")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch-size", type=int, default=2, help="images per step (the official setting: 2 per GPU)")
    p.add_argument("--mixed-precision", default="fp16", choices=("no", "fp16", "bf16"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--adapters", default="full,lora", help="step part: comma-separated, full and/or lora")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    start = time.perf_counter()
    folder = build_folder(Path(args.model_dir), args.tiny)
    built = time.perf_counter() - start
    settings = BenchSettings(model=str(folder), batch_size=args.batch_size, mixed_precision=args.mixed_precision,
                             steps=args.steps, warmup=args.warmup, memory_steps=2, lora_rank=4,
                             official=("full", "lora"))
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.part == "e2e":
        # matched Q_ref for our "no_cache"/"cache" pair too: the runs beside the official design are what matter
        report = {"end_to_end": bench_end_to_end(replace(settings, end_to_end=True), adapter="full",
                                                 loss="kto_matched", rows=32, progress=log)}
    else:
        report = bench_step(replace(settings, official=(), adapters=tuple(args.adapters.split(","))), progress=log)
    write_report(report, "SD 1.5-shaped, random weights" + (" (tiny)" if args.tiny else ""), built, start, args.out)
    return 0


def write_report(report: dict, model: str, built: float, start: float, out: str) -> None:
    """Add the model, device, torch version and times to a bench report; write it as JSON to ``out`` and print it."""
    report.update(model=model, device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  torch=torch.__version__, build_s=round(built, 1), seconds=round(time.perf_counter() - start, 1))
    text = json.dumps(report, indent=1)
    Path(out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
