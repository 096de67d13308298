"""`dkto generate`, `dkto label serve|export` and `dkto loop`: the commands that gather feedback. Parsing only (like
:mod:`diffusion_kto.cli`, which adds these to its parser); each hands its arguments to :mod:`diffusion_kto.apps`."""
from __future__ import annotations

from pathlib import Path


def add_generate(sub) -> None:
    """`dkto generate`: images of a model into a labeling queue."""
    p = sub.add_parser(
        "generate",
        help="draw images of a model into a labeling-queue folder (for dkto label serve); resumable",
        description="Example: dkto generate --model toy --prompts toy --per-prompt 4 --out queue/round1",
    )
    p.add_argument("--model", default="toy", help="hub id, local diffusers folder, or 'toy'")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--lora", help="run folder holding pytorch_lora_weights.safetensors")
    group.add_argument("--unet", help="run folder of a full fine-tune (holding unet/ or transformer/)")
    p.add_argument("--prompts", default="toy", help="'toy' (the shapes world's training prompts) or a .txt/.jsonl/.csv")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 20 on toy, 25 otherwise)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default 3.0 on toy, 7.5 otherwise)")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="queue folder; running the same command again resumes it")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    """Draw the queue."""
    from .apps.generate import GenerateSettings, generate_queue

    if args.per_prompt < 1 or args.batch_size < 1:
        raise SystemExit("dkto generate: --per-prompt and --batch-size must be >= 1")
    settings = GenerateSettings(model=args.model, lora=args.lora, unet=args.unet, prompts=args.prompts,
                                per_prompt=args.per_prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                                resolution=args.resolution, batch_size=args.batch_size)
    out = generate_queue(args.out, settings)
    print(f"queue ready: {out}; label it with: dkto label serve {out}")
    return 0


def add_label(sub) -> None:
    """`dkto label serve` and `dkto label export`."""
    p = sub.add_parser("label", help="people label a queue's images in a web app; export their labels as feedback")
    label = p.add_subparsers(dest="label_command", required=True)
    serve = label.add_parser(
        "serve", help="the labeling web app (keys: l/-> like, d/<- dislike, s skip, u undo)",
        description="Example: dkto label serve queue/round1, then open http://127.0.0.1:8765/?rater=alice")
    serve.add_argument("folder", help="a queue folder written by dkto generate; labels go to its labels.sqlite")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback: --token needed)")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN'; open the page as /?token=TOKEN")
    serve.set_defaults(func=_run_label_serve)
    export = label.add_parser(
        "export", help="labels -> feedback JSONL for dkto train (skips left out, disagreements resolved by --policy)",
        description="Example: dkto label export queue/round1 --out data/round1.jsonl")
    export.add_argument("folder")
    export.add_argument("--out", required=True, help="feedback JSONL to write (never overwritten)")
    export.add_argument("--policy", default="majority", choices=("majority", "unanimous", "any-like"),
                        help="raters who disagree: majority (ties dropped, default), unanimous, any-like")
    export.set_defaults(func=_run_label_export)


def _run_label_serve(args) -> int:
    """Serve the labeling app until interrupted."""
    from .apps.label.server import serve

    serve(args.folder, host=args.host, port=args.port, token=args.token)
    return 0


def _run_label_export(args) -> int:
    """Export the labels as feedback JSONL."""
    from .apps.label.export import export_labels

    counts = export_labels(args.folder, args.out, args.policy)
    print(f"wrote {args.out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def add_loop(sub) -> None:
    """`dkto loop`: online rounds."""
    p = sub.add_parser(
        "loop",
        help="online rounds: generate -> labels (a judge or people) -> train KTO -> evaluate, with guards; resumable",
        description="Example: dkto loop --model toy --judge preference --rounds 8 --per-round 128 --out runs/loop. "
                    "The first loops' rounds: --replay last --optimizer fresh --prompt-choice fixed "
                    "--samples-per-prompt 1",
    )
    p.add_argument("--model", default="toy", help="the base model (default: the shipped shapes-world model)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--judge", help="label with a judge: the same specs as dkto demo --judge")
    who.add_argument("--human", action="store_true", help="label with people: serves the labeling app each round and "
                                                          "waits until every image of the round is labelled")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--per-round", type=int, default=128, help="images generated and labelled per round")
    p.add_argument("--replay", default="all",
                   help="all: each round trains on every round's labels so far (default); last: on its own only")
    p.add_argument("--optimizer", default="keep",
                   help="keep: carry AdamW's state from round to round with the weights (default); fresh: a new one")
    p.add_argument("--prompt-choice", default="uncertain",
                   help="uncertain: prompts whose liked share so far is nearest 0.5 first (default; round 1 in turn); "
                        "cycle: in turn across rounds; fixed: from the first prompt every round")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="images of each chosen prompt in a round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.85, help="--judge: liked = score >= threshold")
    p.add_argument("--label-noise", type=float, default=0.0, help="--judge: probability of flipping each label")
    p.add_argument("--guard", type=float, default=0.9,
                   help="a round whose prompt fidelity falls below this share of the base's is rolled back")
    p.add_argument("--diversity-guard", type=float, default=0.75,
                   help="... or whose diversity falls below this share of the base's (docs/labeling.md)")
    p.add_argument("--groups", type=int, default=8, help="seed groups per held-out prompt in each evaluation")
    p.add_argument("--images-per-prompt", type=int, default=5, help="N of the median-of-N win rate (paper: 5)")
    p.add_argument("--eval-judge", default=None,
                   help="judge of the held-out images (default: --judge; with --human: the shapes world's preference)")
    p.add_argument("--host", default="127.0.0.1", help="--human: where the labeling app listens")
    p.add_argument("--port", type=int, default=8765, help="--human: the labeling app's port")
    p.add_argument("--token", default=None, help="--human: the labeling app's token")
    p.add_argument("--config", default=None, help="training config (default: configs/toy-kto.yaml)")
    p.add_argument("--out", required=True, help="loop folder; running the same command again resumes it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    p.set_defaults(func=_run_loop)


def _run_loop(args) -> int:
    """Run (or resume) the rounds."""
    from .apps.loop import LoopSettings, run_loop

    settings = LoopSettings(out=Path(args.out), model=args.model, judge=args.judge, human=args.human,
                            rounds=args.rounds, per_round=args.per_round, seed=args.seed, threshold=args.threshold,
                            replay=args.replay, optimizer=args.optimizer, prompt_choice=args.prompt_choice,
                            samples_per_prompt=args.samples_per_prompt,
                            label_noise=args.label_noise, guard=args.guard, diversity_guard=args.diversity_guard,
                            groups_per_prompt=args.groups,
                            images_per_prompt=args.images_per_prompt, eval_judge=args.eval_judge,
                            host=args.host, port=args.port, token=args.token,
                            config=Path(args.config) if args.config else None, overrides=tuple(args.overrides))
    run_loop(settings)
    return 0

