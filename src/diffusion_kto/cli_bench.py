"""`dkto bench step|align|regimes|utility2d`: the benchmark commands. Parsing only (like
:mod:`diffusion_kto.cli_feedback`); each hands its arguments to :mod:`diffusion_kto.apps`."""
from __future__ import annotations

import sys
from pathlib import Path


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks of the training code")
    bench = p.add_subparsers(dest="bench_command", required=True)
    step = bench.add_parser(
        "step",
        help="median step time and peak memory of sft, kto (matched, mismatched, amortized) and dpo, LoRA and full, "
             "as JSON",
        description="Example: dkto bench step --threads 1 --repeats 3 --out benchmarks/results/step.json",
    )
    step.add_argument("--model", default="toy", help="hub id, local diffusers folder, or 'toy' (the shipped model)")
    step.add_argument("--batch-size", type=int, default=4, help="images a step, even (dpo: half as many pairs)")
    step.add_argument("--resolution", type=int, default=None, help="default: the VAE's sample_size")
    step.add_argument("--adapters", default="lora,full", help="comma-separated: lora, full")
    step.add_argument("--losses", default="sft,kto_matched,kto_mismatched,kto_amortized",
                      help="comma-separated, sft included: sft, kto_matched, kto_mismatched, kto_amortized, dpo")
    step.add_argument("--lora-rank", type=int, default=4)
    step.add_argument("--steps", type=int, default=20, help="timed steps per run (after warm-up)")
    step.add_argument("--warmup", type=int, default=3)
    step.add_argument("--repeats", type=int, default=1, help="rounds over all modes (times pooled)")
    step.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker")
    step.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    step.add_argument("--end-to-end", action="store_true",
                      help="also time whole `dkto train` runs (loading, encoding, logging) without and with data.cache")
    step.add_argument("--official", default="full",
                      help="with --end-to-end: adapters (lora, full, or none) on which the official script's step "
                           "design is timed beside ours, with the ratio ours / official")
    step.add_argument("--cached", action="store_true",
                      help="train every mode from a `dkto cache` of the feedback: no VAE or text encoder loaded")
    step.add_argument("--out", default=None, help="also write the JSON here")
    step.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides for every mode")
    step.set_defaults(func=_run_bench_step)
    align = bench.add_parser(
        "align",
        help="KTO vs SFT, CSFT, DPO and other utilities on the shapes world (the paper's Table 1 in miniature)",
        description="Example: dkto bench align --quick --out runs/bench-align",
    )
    align.add_argument("--out", default="runs/bench-align", help="work folder (reused: finished runs are kept)")
    align.add_argument("--quick", action="store_true", help="1 seed (unless --seeds), 1 trial (lr 4e-5), 80 steps, 512 feedback images: the quick look")
    align.add_argument("--seeds", type=int, default=None, help="training seeds per method (default 3; 1 with --quick)")
    align.add_argument("--budget", type=int, default=1024, help="feedback images, shared by every method")
    align.add_argument("--methods", default=None,
                       help="comma-separated subset of the methods (kto is always run), e.g. kto,kto_paired,dpo")
    align.set_defaults(func=_run_bench_align)
    _add_regimes(bench)
    utility = bench.add_parser("utility2d", help="the paper's 2-D utility-function experiment (§6, Fig. 6)")
    utility.add_argument("--out", default="runs/utility2d")
    utility.add_argument("--seed", type=int, default=0)
    utility.add_argument("--beta", type=float, default=None,
                         help="one beta for every utility (default: set from the SFT fine-tune, see apps/utility2d.py)")
    utility.add_argument("--gamma", type=float, default=0.8, help="share of liked points in a batch (paper: 0.8)")
    utility.set_defaults(func=_run_bench_utility2d)


def _add_regimes(bench) -> None:
    """`dkto bench regimes`."""
    regimes = bench.add_parser(
        "regimes", help="each objective under the feedback regimes users meet (pairs, one image per prompt, flipped "
                        "labels, 10%% liked, likes only)",
        description="Example: dkto bench regimes --quick --regimes a,b,e --out runs/bench-regimes")
    regimes.add_argument("--out", default="runs/bench-regimes", help="work folder (reused: finished runs are kept)")
    regimes.add_argument("--quick", action="store_true", help="1 training seed")
    regimes.add_argument("--seeds", type=int, default=None, help="training seeds (default 3; 1 with --quick)")
    regimes.add_argument("--regimes", default=None, help="comma-separated subset of a,b,c15,c30,d,e")
    regimes.add_argument("--methods", default=None, help="comma-separated subset of kto,kto_paired,bco,nft,sft,dpo")
    regimes.add_argument("--budget", type=int, default=512, help="judged base images before the regimes transform them")
    regimes.add_argument("--steps", type=int, default=80, help="training steps per method")
    regimes.add_argument("--tune", action="store_true",
                         help="tune each method per regime (its beta and the lr) on a training seed of its own")
    regimes.set_defaults(func=_run_bench_regimes)

def _run_bench_align(args) -> int:
    from .apps.bench_align import AlignSettings, run_bench_align

    methods = {} if args.methods is None else {"methods": tuple(m.strip() for m in args.methods.split(",") if m.strip())}
    run_bench_align(AlignSettings(out=Path(args.out), quick=args.quick, seeds=args.seeds, budget=args.budget,
                                  **methods))
    print(f"wrote {Path(args.out) / 'align.md'} and {Path(args.out) / 'report.html'}")
    return 0


def _run_bench_regimes(args) -> int:
    from .apps.bench_regimes import RegimeSettings, run_bench_regimes

    subsets = {key: tuple(x.strip() for x in value.split(",") if x.strip())
               for key, value in (("regimes", args.regimes), ("methods", args.methods)) if value}
    run_bench_regimes(RegimeSettings(out=Path(args.out), quick=args.quick, seeds=args.seeds, budget=args.budget,
                                     steps=args.steps, tune=args.tune, **subsets))
    print(f"wrote {Path(args.out) / 'regimes.md'} and {Path(args.out) / 'frontier.png'}")
    return 0


def _run_bench_utility2d(args) -> int:
    import json

    from .apps.utility2d import Recipe2D, run

    command = f"dkto bench utility2d --out {args.out} --seed {args.seed} --gamma {args.gamma:g}" + (
        f" --beta {args.beta:g}" if args.beta is not None else "")
    recipe = Recipe2D(seed=args.seed, beta=args.beta, desirable_ratio=args.gamma)
    results = run(args.out, recipe, command=command)
    headline = {k: {m: v for m, v in results[k].items() if m not in ("trace", "last")} for k in results
                if not k.startswith("_")}
    print(json.dumps({**headline, "beta": results["_beta"], "seconds": results["_seconds"]}, indent=1))
    print(f"wrote {Path(args.out) / 'utility2d.md'}, utility2d.png and utility2d.json")
    return 0


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names; "none" is the empty list."""
    return tuple(a.strip() for a in text.split(",") if a.strip() not in ("", "none"))


def _run_bench_step(args) -> int:
    import json

    from .apps.bench_step import BenchSettings, bench_step

    settings = BenchSettings(
        model=args.model, batch_size=args.batch_size, resolution=args.resolution,
        adapters=_names(args.adapters), losses=_names(args.losses), lora_rank=args.lora_rank,
        steps=args.steps, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
        mixed_precision=args.mixed_precision, overrides=tuple(args.overrides), end_to_end=args.end_to_end,
        official=_names(args.official), cached=args.cached,
    )
    report = bench_step(settings, progress=lambda line: print(line, file=sys.stderr))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
