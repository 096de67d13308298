"""FLUX.2 [klein] 4B-, Qwen-Image-, Z-Image- and Chroma-sized LoRA step time, peak memory and MFU on a GPU, with
random weights: LoRA KTO (matched) beside LoRA SFT at 1024 px, bf16, trained from a `dkto cache` (no VAE or text
encoder in memory, as a 24 GB card trains them), with the frozen base in bf16 and quantized.

No download: each pipeline is built from the transformer config values below with random weights, in bf16, and saved
as a diffusers folder; the VAEs are diffusers' defaults for AutoencoderKLFlux2 / AutoencoderKLQwenImage (the
published ones) and the 16-channel Flux VAE of benchmarks/flow_gpu.py. The config values were written down from the
hub repos' transformer/config.json files and cannot be re-read from this project's machines (no hub): check them
before quoting a number. Step time and memory do not depend on the weights' values.

Text encoders: the cache is built once with them, and training never loads them, so each keeps its published width
(the features' width is the transformer's input) but only the depth the pipeline reads: Qwen3-4B's 36 layers for
[klein] (layers 9, 18, 27) and Z-Image (the second-to-last), one Qwen2.5-VL layer for Qwen-Image (its last hidden
state), T5-XXL for Chroma. Tokenizers are the tests' offline ones with the pipelines' text context (512 tokens; 1024
after the template for Qwen-Image), so the sequence lengths are the real ones.

    python benchmarks/families_gpu.py --family flux2-klein --out klein.json          (bf16 and quantized)
    python benchmarks/families_gpu.py --family qwen-image --quantize nf4 --out qwen.json
    python benchmarks/families_gpu.py --family z-image --tiny --out tiny.json        (a CPU smoke run, 64 px)

MFU = step_flops / step time / the card's dense bf16 peak (--peak-tflops; 989 for an H100 or H200 SXM). FLUX.2 [dev]
(32B: 64 GB in bf16) does not fit the lent machines' 64 GB disk as a saved folder and is not built here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from flow_gpu import T5_XXL, VAE_16CH, tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the offline Qwen tokenizer of the tests

TRANSFORMERS = {  # transformer/config.json values of the published models (see the docstring)
    "flux2-klein": dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
                        mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False),
    "qwen-image": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
    "z-image": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                    n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48],
                    axes_lens=[1536, 512, 512]),
    "chroma": dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
                   approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5),
}
TINY = {  # shrunken values for the CPU smoke run
    "flux2-klein": dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                        joint_attention_dim=48, axes_dims_rope=(2, 2, 2, 2)),
    "qwen-image": dict(num_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                       axes_dims_rope=(2, 2, 4)),
    "z-image": dict(dim=16, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                    axes_dims=[2, 2, 4], axes_lens=[64, 16, 16]),
    "chroma": dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                   joint_attention_dim=64, axes_dims_rope=(2, 2, 4), approximator_hidden_dim=32,
                   approximator_layers=1),
}
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128)
QWEN25_VL_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=1, num_attention_heads=28,
                      num_key_value_heads=4)
PIPELINES = {"flux2-klein": "Flux2KleinPipeline", "qwen-image": "QwenImagePipeline", "z-image": "ZImagePipeline",
             "chroma": "ChromaPipeline"}


def qwen_tokenizer(context: int):
    """The tests' offline byte-level BPE Qwen tokenizer with the pipeline's text context."""
    from tiny_llm import qwen_tokenizer as build

    tokenizer = build()
    tokenizer.model_max_length = context
    return tokenizer


def qwen3(tokenizer, tiny: bool, cls_name: str):
    """Qwen3-4B's width and depth (or 28 / 2 tiny layers), the tokenizer's small vocabulary."""
    import transformers

    size = dict(QWEN3_4B) if not tiny else dict(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                                num_key_value_heads=1, head_dim=8, num_hidden_layers=28)
    return getattr(transformers, cls_name)(transformers.Qwen3Config(
        vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **size))


def qwen25_vl(tokenizer, tiny: bool):
    """Qwen2.5-VL 7B's text width, one text layer (the last hidden state is read), a one-block vision tower."""
    import transformers

    text = dict(QWEN25_VL_TEXT) if not tiny else dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                      num_attention_heads=2, num_key_value_heads=1)
    ids = tokenizer.convert_tokens_to_ids
    text.update(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24] if not tiny else [1, 1, 2]},
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=16)
    return transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>")))


def components(family: str, tiny: bool) -> dict:
    """The pipeline's modules with random weights (built on the GPU when there is one)."""
    import diffusers

    net = {**TRANSFORMERS[family], **(TINY[family] if tiny else {})}
    small_vae = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8)
    flux_vae = dict(**{**VAE_16CH, **(small_vae if tiny else {})}, scaling_factor=0.3611, shift_factor=0.1159)
    if family == "flux2-klein":
        tokenizer = qwen_tokenizer(512)
        vae = diffusers.AutoencoderKLFlux2(**(dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                                    norm_num_groups=8) if tiny else {}))
        return dict(transformer=diffusers.Flux2Transformer2DModel(**net), vae=vae, tokenizer=tokenizer,
                    text_encoder=qwen3(tokenizer, tiny, "Qwen3ForCausalLM"), is_distilled=True,
                    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                                        time_shift_type="exponential"))
    if family == "qwen-image":
        tokenizer = qwen_tokenizer(1024 + 34)
        vae = diffusers.AutoencoderKLQwenImage(**(dict(base_dim=8) if tiny else {}))
        return dict(transformer=diffusers.QwenImageTransformer2DModel(**net), vae=vae, tokenizer=tokenizer,
                    text_encoder=qwen25_vl(tokenizer, tiny), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
                        use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                        max_image_seq_len=8192, shift=1.0))
    if family == "z-image":
        tokenizer = qwen_tokenizer(512)
        return dict(transformer=diffusers.ZImageTransformer2DModel(**net), vae=diffusers.AutoencoderKL(**flux_vae),
                    tokenizer=tokenizer, text_encoder=qwen3(tokenizer, tiny, "Qwen3Model"),
                    scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    _, t5_tokenizer = tokenizers(512)
    from transformers import T5Config, T5EncoderModel

    t5 = {**T5_XXL, **(dict(d_model=64, d_ff=64, d_kv=16, num_heads=4, num_layers=1) if tiny else {})}
    return dict(transformer=diffusers.ChromaTransformer2DModel(**net), vae=diffusers.AutoencoderKL(**flux_vae),
                tokenizer=t5_tokenizer, text_encoder=T5EncoderModel(T5Config(**t5)),
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                                    max_shift=1.15, base_image_seq_len=256,
                                                                    max_image_seq_len=4096))


def build_folder(family: str, out: Path, tiny: bool) -> Path:
    """Save a random-weight pipeline of ``family`` in bf16 (skipped when the folder is there)."""
    import diffusers

    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        parts = components(family, tiny)
    pipe = getattr(diffusers, PIPELINES[family])(**parts)
    pipe.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return out


def mfu(report: dict, peak_tflops: float) -> dict:
    """Per mode: step FLOPs / median step time / the card's peak (None without a count or on the CPU)."""
    out = {}
    for adapter, modes in report["results"].items():
        for loss, m in modes.items():
            flops, ms = m.get("step_flops"), m["step_ms_median"]
            out[f"{adapter}.{loss}"] = round(flops / (ms / 1e3) / (peak_tflops * 1e12), 4) if flops and ms else None
    return out


def run(folder: Path, args, quantize: str) -> dict:
    """`dkto bench step --cached` on the folder: LoRA SFT and KTO (matched), one quantization of the base."""
    from diffusion_kto.apps.bench_step import BenchSettings, bench_step

    overrides = ["train.gradient_checkpointing=true"] if args.checkpointing else []
    if quantize != "none":
        overrides.append(f"model.quantize_base={quantize}")
    settings = BenchSettings(model=str(folder), batch_size=args.batch_size,
                             resolution=64 if args.tiny else args.resolution, adapters=("lora",), lora_rank=16,
                             steps=args.steps, warmup=args.warmup, memory_steps=2, mixed_precision="bf16",
                             losses=("sft", "kto_matched"), overrides=tuple(overrides), cached=True)
    report = bench_step(settings, progress=lambda line: print(f"[{quantize}] {line}", file=sys.stderr, flush=True))
    report["mfu"] = mfu(report, args.peak_tflops) if torch.cuda.is_available() else None
    return report


def main() -> int:
    """Build (or reuse) one family's folder, bench it with the base in bf16 and quantized, print and write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=tuple(TRANSFORMERS), required=True)
    p.add_argument("--model-dir", default=None, help="default: /tmp/<family>-random (or -tiny)")
    p.add_argument("--tiny", action="store_true", help="shrunken configs at 64 px, for a CPU smoke run")
    p.add_argument("--quantize", default="none,nf4", help="comma-separated model.quantize_base values to run")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--checkpointing", action="store_true", help="train.gradient_checkpointing=true in every mode")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (H100 / H200 SXM)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    start = time.perf_counter()
    folder = build_folder(args.family, Path(args.model_dir or f"/tmp/{args.family}-{'tiny' if args.tiny else 'random'}"),
                          args.tiny)
    built = time.perf_counter() - start
    runs = {q: run(folder, args, q) for q in args.quantize.split(",")}
    report = {"family": args.family, "model": f"{args.family}-shaped, random weights, bf16" + (" (tiny)" * args.tiny),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "build_s": round(built, 1), "runs": runs,
              "seconds": round(time.perf_counter() - start, 1)}
    text = json.dumps(report, indent=1)
    Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
