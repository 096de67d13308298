"""`dkto`: the command line. Parsing only; every subcommand hands a config or arguments to the library.

Smallest runnable example (CPU, seconds; uses the shipped tiny shapes-world model)::

    dkto demo --out runs/demo
    dkto train --config configs/toy-kto.yaml data.path=runs/demo/feedback train.output_dir=runs/my-run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_bench import add_bench
from .cli_feedback import add_generate, add_label, add_loop


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model with Diffusion-KTO from like/dislike feedback",
        description="Example: dkto train --config configs/sd15-kto-lora.yaml data.path=feedback.jsonl loss.beta=2000",
    )
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
    p.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="re-launch through accelerate on N processes (GPUs, or CPU with gloo); "
                        "train.batch_size is per process")
    p.set_defaults(func=_run_train)


def _add_cache(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="precompute VAE latents (and text embeddings) of a feedback set, for data.cache=DIR",
        description="Example: dkto cache --config configs/sd15-kto-lora.yaml data.path=feedback.jsonl --out cache/fox; "
                    "then dkto train ... data.cache=cache/fox. Uses data.resolution, data.random_flip (both "
                    "flips are cached), data.caption_dropout and loss.name (the prompts to embed) and model.*.",
    )
    p.add_argument("--config", help="YAML run config: the one you will train with")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.path=...")
    p.add_argument("--out", default=None, help="cache folder (default: data.cache of the config)")
    p.add_argument("--no-text", action="store_true", help="cache latents only; the text encoder runs while training")
    p.add_argument("--shard-size", type=int, default=1024, help="images (prompts) per safetensors shard")
    p.add_argument("--batch-size", type=int, default=16, help="images per VAE batch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache in --out")
    p.set_defaults(func=_run_cache)


def _run_cache(args) -> int:
    from .config import ConfigError, load_config
    from .train.precompute import build_cache

    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.data.cache
    if out is None:
        raise ConfigError("dkto cache needs --out DIR (or data.cache=DIR)")
    manifest = build_cache(cfg, out, text=not args.no_text, overwrite=args.overwrite, shard_size=args.shard_size,
                           batch_size=args.batch_size, progress=lambda line: print(line, file=sys.stderr))
    print(f"wrote {manifest}; train with data.cache={out}")
    return 0


def _add_check_config(sub) -> None:
    p = sub.add_parser("check-config", help="validate a config and print the resolved values (loads no model)")
    p.add_argument("--config")
    p.add_argument("--data", action="store_true",
                   help="also read and validate the feedback at data.path (as `dkto train` would, with "
                        "data.on_bad_row) and print its counts")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_run_check_config)


def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images from a base model plus an optional trained LoRA or UNet",
        description="Example: dkto sample --model toy --lora runs/my-run --prompt 'a red circle' --out samples",
    )
    p.add_argument("--model", required=True, help="hub id, local diffusers folder, or 'toy'")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--lora", help="folder holding pytorch_lora_weights.safetensors")
    group.add_argument("--unet", help="a full fine-tune's network: a diffusers UNet or SD3 / Flux transformer folder, "
                                      "or a run folder with unet/ or transformer/")
    p.add_argument("--vae", default=None, help="a separate VAE (folder or hub id), e.g. an fp16-safe SDXL VAE")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.set_defaults(func=_run_sample)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's or a checkpoint's LoRA as one file with diffusers or kohya keys (ComfyUI, A1111, Forge)",
        description="Example: dkto export runs/fox --format kohya --out fox-kohya.safetensors   (RUN_DIR: a run folder "
                    "or one of its checkpoints/checkpoint-N folders; see docs/models.md for which tools load which)",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a dkto train output_dir, or a checkpoint folder in it")
    p.add_argument("--format", required=True, choices=("diffusers", "kohya"),
                   help="diffusers: pipe.load_lora_weights; kohya: lora_unet_* keys for ComfyUI, A1111 / Forge, kohya")
    p.add_argument("--out", required=True, metavar="FILE", help="the .safetensors file to write (must not exist)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from .apps.export import READERS, export_lora

    path = export_lora(args.run_dir, args.format, args.out)
    print(f"wrote {path} ({args.format} keys; loads in {READERS[args.format]})")
    return 0


def _add_toy(sub) -> None:
    p = sub.add_parser("toy", help="the tiny shapes world: pretrain its base model")
    toy = p.add_subparsers(dest="toy_command", required=True)
    pre = toy.add_parser("pretrain", help="train a tiny shapes-world model from scratch on CPU: Stable Diffusion "
                                          "(--family sd) or the flow-matching SD3-format one (--family flow)")
    pre.add_argument("--out", required=True)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--family", choices=("sd", "flow"), default="sd",
                     help="sd: the `toy` model (UNet, DDPM); flow: `toy-flow` (SD3 transformer, rectified flow)")
    pre.set_defaults(func=_run_toy_pretrain)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole loop on the shipped shapes world: feedback, Diffusion-KTO, win rate, report (CPU, minutes)",
        description="Example: dkto demo --out runs/demo",
    )
    p.add_argument("--out", default="runs/demo", help="output folder (must not exist or be empty)")
    p.add_argument("--judge", default="preference",
                   help="a shapes-world judge (preference, fidelity, aesthetic, ...), provider:name, "
                        "package.module:callable, or path/to/file.py:callable")
    p.add_argument("--budget", type=int, default=1024, help="feedback images to generate and judge")
    p.add_argument("--model", default="toy", help="base pipeline: toy (default, the shipped shapes-world SD model), "
                                                  "toy-flow (its flow-matching SD3-format sibling) or a folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=None, help="liked = judge score >= threshold (default 0.85)")
    p.add_argument("--label-noise", type=float, default=0.0, help="probability of flipping each label")
    p.add_argument("--groups", type=int, default=8, help="seed groups per held-out prompt in the evaluation")
    p.add_argument("--guard", type=float, default=0.9,
                   help="the aligned model fails its guard below this share of the base's prompt fidelity ...")
    p.add_argument("--diversity-guard", type=float, default=0.75, help="... or below this share of its diversity")
    p.add_argument("--guard-checks", type=int, default=8,
                   help="checkpoints written for the guards (--guard-search checkpoints checks them newest first and keeps "
                        "the newest that passes); 0: no rollback, keep the final model whatever the guards say")
    p.add_argument("--guard-search", choices=("chord", "checkpoints"), default="chord",  # guard_rollback.SEARCHES
                   help="what a rollback keeps: the newest passing checkpoint, or the largest alpha on the chord "
                        "theta_0 + alpha (theta_T - theta_0) from the base to the final weights that passes")
    p.add_argument("--config", default=None, help="training config (default: the model's, configs/toy-kto.yaml for "
                                                  "toy, configs/toy-flow-kto.yaml for toy-flow)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .apps.demo import DemoSettings, run_demo

    settings = DemoSettings(out=Path(args.out), model=args.model, judge=args.judge, budget=args.budget, seed=args.seed,
                            threshold=DemoSettings.threshold if args.threshold is None else args.threshold,
                            label_noise=args.label_noise, groups_per_prompt=args.groups, guard=args.guard,
                            diversity_guard=args.diversity_guard, guard_checks=args.guard_checks,
                            guard_search=args.guard_search, config=Path(args.config) if args.config else None, overrides=tuple(args.overrides))
    run_demo(settings)
    return 0


def _run_train(args) -> int:
    from .config import load_config
    from .data.bad_rows import SKIPPED_ROWS_FILE
    from .train import DiffusionKTOTrainer
    from .train.distributed.launch import maybe_launch

    code = maybe_launch(args.num_processes, (["--config", args.config] if args.config else []) + args.overrides)
    if code is not None:
        return code
    cfg = load_config(args.config, args.overrides)
    result = DiffusionKTOTrainer(cfg).train()
    if not result.main_process:
        return 0
    print(f"trained {result.steps} steps in {result.seconds:.1f}s ({result.images_per_second:.2f} images/s, "
          f"{result.data_wait_seconds:.1f}s waiting on data)")
    if result.data is not None:
        print(f"data: {result.data.describe()}")
    if result.data is not None and result.data.n_skipped:
        print(f"skipped rows are listed in {result.output_dir / SKIPPED_ROWS_FILE}")
    for path in result.exported:
        print(f"exported {path}")
    return 0


def _run_check_config(args) -> int:
    import yaml

    from .config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    if args.data:
        from .train import load_feedback

        print(f"# data: {load_feedback(cfg).summary.describe()}")
    return 0


def _run_sample(args) -> int:
    from .sampling import generate, load_pipeline

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"dkto sample: output folder {out} exists and is not empty; choose another --out")
    pipe = load_pipeline(args.model, lora=args.lora, unet=args.unet, vae=args.vae)
    prompts = [p for p in args.prompt for _ in range(args.num)]
    seeds = [args.seed + i for _ in args.prompt for i in range(args.num)]
    images = generate(pipe, prompts, seeds, steps=args.steps, guidance=args.guidance,
                      resolution=args.resolution, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, prompt, seed) in enumerate(zip(images, prompts, seeds)):
        img.save(out / f"{i:04d}-seed{seed}.png")
    print(f"wrote {len(images)} images to {out}")
    return 0


def _run_toy_pretrain(args) -> int:
    from .toy import pretrain

    pretrain(args.family, out_dir=args.out, seed=args.seed)
    return 0


def _add_convert(sub) -> None:
    # names as in data/convert.py (not imported here: the data package pulls in torch, too slow for --help)
    policies = ("win_intermediate", "win_only", "win_vs_rest", "gt_label_wi_l", "gt_label_w_l", "gt_label_w_il")
    p = sub.add_parser("convert", help="convert preference data into like/dislike feedback (see docs/data.md)")
    conv = p.add_subparsers(dest="convert_command", required=True)
    pick = conv.add_parser(
        "pickapic",
        help="Pick-a-Pic v2 pairs -> one liked/disliked row per unique image (the paper's data)",
        description="Example: dkto convert pickapic --src yuvalkirstain/pickapic_v2 --out data/pickapic-kto",
    )
    pick.add_argument("--src", default="yuvalkirstain/pickapic_v2", help="local parquet file or folder, or a hub id (streamed)")
    pick.add_argument("--ties", choices=("neither", "win", "lose"), default="neither", help="how a 0.5/0.5 tie counts")
    pick.add_argument("--split", default="train")
    pick.add_argument("--limit", type=int, default=None, help="read at most this many rows")
    pairs = conv.add_parser("pairs", help="paired preferences (prompt, chosen, rejected) -> liked/disliked rows")
    pairs.add_argument("--src", required=True, help=".jsonl / .csv / .parquet file, parquet folder, or hub id")
    pairs.add_argument("--prompt-column", default="prompt")
    pairs.add_argument("--chosen-column", default="chosen")
    pairs.add_argument("--rejected-column", default="rejected")
    pairs.add_argument("--split", default="train")
    official = conv.add_parser("official-csv", help="the official Diffusion-KTO CSV (file_name, caption, split) -> JSONL")
    official.add_argument("--src", required=True)
    for q in (pick, pairs, official):
        q.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
        q.add_argument("--policy", choices=policies, default="win_intermediate",
                       help="which images are liked (docs/data.md); default: preferred at least once")
    to_pairs = conv.add_parser("to-pairs", help="liked x disliked rows of the same prompt -> pairs.jsonl")
    to_pairs.add_argument("--src", required=True, help="feedback data (anything data.path accepts)")
    to_pairs.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    to_pairs.add_argument("--max-pairs-per-prompt", type=int, default=4, help="0: no cap")
    to_pairs.add_argument("--seed", type=int, default=0)
    shards = conv.add_parser("shards", help="feedback -> tar shards for data.streaming=true (docs/data.md)",
                             description="Example: dkto convert shards --src data/feedback.jsonl --out data/shards")
    shards.add_argument("--src", required=True, help="feedback data (anything data.path accepts)")
    shards.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    shards.add_argument("--rows-per-shard", type=int, default=1000)
    p.set_defaults(func=_run_convert)


def _run_convert(args) -> int:
    from .data import convert, read_feedback
    from .data.pairs import feedback_to_pairs, write_pairs

    kind = args.convert_command
    if kind == "to-pairs":
        pairs = feedback_to_pairs(read_feedback(args.src), args.max_pairs_per_prompt or None, args.seed)
        print(f"wrote {len(pairs)} pairs to {write_pairs(pairs, args.out)}")
        return 0
    if kind == "shards":
        from .data.shards import shard_pattern, write_shards

        rows = read_feedback(args.src)
        paths = write_shards(rows, args.out, args.rows_per_shard)
        liked = sum(row.desirable for row in rows)
        print(f"wrote {len(rows)} rows ({liked} liked, {len(rows) - liked} disliked) in {len(paths)} shards: "
              f"{shard_pattern(paths)}")
        return 0
    if kind == "pickapic":
        summary = convert.pickapic_to_feedback(args.src, args.out, args.policy, ties=args.ties, split=args.split,
                                               limit=args.limit, progress=True)
    elif kind == "pairs":
        summary = convert.pairs_to_feedback(args.src, args.out, args.policy, prompt_column=args.prompt_column,
                                            chosen_column=args.chosen_column, rejected_column=args.rejected_column,
                                            split=args.split)
    else:
        summary = convert.official_csv_to_feedback(args.src, args.out, args.policy)
    print("\n".join(summary.lines()))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="compare models with the paper's protocol: paired images, reward models, median-of-N win rates, report",
        description="Example: dkto eval --models aligned=toy+lora:runs/toy-kto base=toy --prompts toy "
                    "--metrics toy:preference --out runs/eval   (see docs/evaluation.md)",
    )
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=BASE[+lora:DIR|+unet:DIR]",
                   help="models to compare; the first is compared against each other one (Table 1 layout)")
    p.add_argument("--prompts", default="toy", help="toy, pickapic[:split], parti, hps[:style], or a .txt/.jsonl/.csv file")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first K prompts")
    p.add_argument("--metrics", action="append", default=None,
                   help="comma-separated: pickscore, clip, aesthetic, hpsv2, imagereward, toy:<judge>; "
                        "NAME=PATH_OR_ID picks weights (default: toy:preference)")
    p.add_argument("--metric-option", action="append", default=[], metavar="METRIC.KEY=VALUE",
                   help="scorer option, e.g. aesthetic.clip=/models/clip-vit-large-patch14 or clip.batch_size=16")
    p.add_argument("--images-per-prompt", type=int, default=5, help="N of the median-of-N protocol (paper: 5)")
    p.add_argument("--seed", type=int, default=0, help="image k of prompt i uses seed + 1000*i + k in every model")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; the toy demos' 20 for toy and toy-flow)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 7.5; 3.0 for toy, 1.0 for toy-flow)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's; 32 for toy)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generation batch")
    p.add_argument("--score-batch-size", type=int, default=32, help="images per scorer batch")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="generation precision (float16 halves GPU time; recorded with the images)")
    pairs = p.add_mutually_exclusive_group()
    pairs.add_argument("--focus", default=None, help="compare this model against each other one (default: the first)")
    pairs.add_argument("--all-pairs", action="store_true", help="compare every pair of models")
    p.add_argument("--ci", choices=("normal", "wilson"), default="normal", help="95%% interval kind")
    p.add_argument("--ci-n", choices=("prompts", "images"), default="prompts",
                   help="trials in the interval: prompts (default) or images (the paper's ± values)")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts shown in the report's image grid")
    p.add_argument("--out", required=True, help="output folder; running again reuses its images and scores")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from .evaluation.run import EvalSettings, ModelSpec, run_eval

    settings = EvalSettings(
        models=[ModelSpec.parse(m) for m in args.models], out=Path(args.out), prompts=args.prompts,
        metrics=args.metrics or ["toy:preference"], metric_options=args.metric_option,
        num_prompts=args.num_prompts, images_per_prompt=args.images_per_prompt, seed=args.seed,
        steps=args.steps, guidance=args.guidance, resolution=args.resolution, batch_size=args.batch_size,
        score_batch_size=args.score_batch_size, device=args.device, dtype=args.dtype, focus=args.focus,
        all_pairs=args.all_pairs, ci=args.ci, ci_n=args.ci_n, grid_prompts=args.grid_prompts)
    results = run_eval(settings)
    print(results["_tables"]["winrates"] or "(one model: no win rates)")
    print(results["_tables"]["means"])
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `dkto` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="dkto", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_cache, _add_check_config, _add_sample, _add_export, _add_demo, _add_toy, _add_convert,
                _add_eval, add_bench, add_generate, add_label, add_loop):
        add(sub)
    return parser


def quiet_import_warnings() -> None:
    """Silence what torchao logs when diffusers imports it (its CUDA-only kernels failing to load on a CPU, torch's
    notes on its enums, diffusers on torchao tensor types it does not find): noise on every command once the [quant]
    extra is installed, nothing a user can act on."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dkto` console script; returns the exit code."""
    from .errors import UserError

    quiet_import_warnings()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileExistsError) as err:  # a user's mistake: one line naming the key, file, row or judge
        print(f"dkto {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
