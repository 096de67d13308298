"""`dkto`: the command line. Parsing only; every subcommand hands a config or arguments to the library.

Smallest runnable example (CPU, seconds; uses the shipped tiny shapes-world model)::

    dkto demo --out runs/demo
    dkto train --config configs/toy-kto.yaml data.path=runs/demo/feedback train.output_dir=runs/my-run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model with Diffusion-KTO from like/dislike feedback",
        description="Example: dkto train --config configs/sd15-kto-lora.yaml data.path=feedback.jsonl loss.beta=2000",
    )
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
    p.set_defaults(func=_run_train)


def _add_check_config(sub) -> None:
    p = sub.add_parser("check-config", help="validate a config and print the resolved values (loads no model)")
    p.add_argument("--config")
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
    group.add_argument("--unet", help="folder holding a diffusers UNet (or a run folder with unet/)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.set_defaults(func=_run_sample)


def _add_toy(sub) -> None:
    p = sub.add_parser("toy", help="the tiny shapes world: pretrain its base model")
    toy = p.add_subparsers(dest="toy_command", required=True)
    pre = toy.add_parser("pretrain", help="train the tiny shapes-world Stable Diffusion from scratch on CPU")
    pre.add_argument("--out", required=True)
    pre.add_argument("--seed", type=int, default=0)
    pre.set_defaults(func=_run_toy_pretrain)


def _run_train(args) -> int:
    from .config import load_config
    from .train import DiffusionKTOTrainer

    cfg = load_config(args.config, args.overrides)
    result = DiffusionKTOTrainer(cfg).train()
    print(f"trained {result.steps} steps in {result.seconds:.1f}s ({result.images_per_second:.2f} images/s)")
    for path in result.exported:
        print(f"exported {path}")
    return 0


def _run_check_config(args) -> int:
    import yaml

    from .config import load_config, to_dict

    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def _run_sample(args) -> int:
    from .sampling import generate, load_pipeline

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"dkto sample: output folder {out} exists and is not empty; choose another --out")
    pipe = load_pipeline(args.model, lora=args.lora, unet=args.unet)
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
    from .toy.pretrain import pretrain

    pretrain(out_dir=args.out, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `dkto` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="dkto", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_check_config, _add_sample, _add_toy):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dkto` console script; returns the exit code."""
    from .config import ConfigError
    from .data import FeedbackError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FeedbackError) as err:
        print(f"dkto {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
