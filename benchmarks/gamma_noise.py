"""Does drawing liked images at gamma 0.8 amplify flipped labels? (issue 23, regime c; benchmarks/results/regimes.md)

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/gamma_noise.py --regimes a,c15 --variants NAME=OVERRIDES;...
        [--methods kto] [--seeds 3] [--out runs/gamma-noise] [--json benchmarks/results/gamma-noise.json]

The hypothesis: the gamma-sampler draws each *noisily* liked row ~gamma / liked share times as often as its natural
rate. Under flips the liked class holds the flipped bad images, so a bad image is drawn as liked about as often as
it is drawn as disliked, and the symmetric sigmoid loss's robustness to flips (its expected gradient is the clean one
scaled by 1 - 2 eps) is lost. Drawing at the natural rate (gamma = the liked share) restores it.

Everything is `dkto bench regimes`' (same feedback: its seed-0 judged 512 images; same regimes, quick settings,
evaluation and seeds): each variant is a method of bench align's table with extra config overrides, trained on the
reported seeds 0..seeds-1, scored by the win rate over the base (preference judge, held-out prompts, median of 5).
`gamma=natural` in a variant's overrides stands for data.desirable_ratio = the regime's liked share.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffusion_kto.apps.bench_align import AlignSettings, eval_seeds, evaluate_method, merge_runs, train_method
from diffusion_kto.apps.bench_regimes import LR, REGIMES, judged_feedback, regime_rows, write_regime
from diffusion_kto.apps.demo import DemoSettings
from diffusion_kto.provenance import commit, machine


def parse_variants(text: str) -> dict[str, tuple[str, ...]]:
    """'g08=;gnat=gamma=natural' -> {'g08': (), 'gnat': ('gamma=natural',)} (overrides split on spaces)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, _, overrides = item.partition("=")
        out[name] = tuple(overrides.split())
    return out


def resolve(overrides: tuple[str, ...], liked_share: float) -> tuple[str, ...]:
    """Replace gamma=natural by data.desirable_ratio=<the regime's liked share>."""
    return tuple(f"data.desirable_ratio={liked_share:.4f}" if o == "gamma=natural" else o for o in overrides)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", default="a,c15")
    ap.add_argument("--methods", default="kto")
    ap.add_argument("--variants", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/gamma-noise"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    start, out = time.perf_counter(), args.out
    out.mkdir(parents=True, exist_ok=True)
    demo = DemoSettings(out=out, budget=512, groups_per_prompt=4)
    source, rows = judged_feedback(demo, out / "feedback")
    results = {"base": merge_runs([evaluate_method("base", None, eval_seeds(demo, s)) for s in range(args.seeds)])}
    variants = parse_variants(args.variants)
    for regime in args.regimes.split(","):
        assert regime in REGIMES, regime
        feedback, kept = write_regime(rows, regime, source, out / f"regime-{regime}")
        share = float(np.mean([r["label"] for r in kept]))
        train = AlignSettings(out=out / f"regime-{regime}", quick=True)
        for method in args.methods.split(","):
            for name, overrides in variants.items():
                extra = resolve(overrides, share)
                runs = [evaluate_method(method, train_method(train, feedback, method, LR, s, extra, f"-{name}"),
                                        eval_seeds(demo, s)) for s in range(args.seeds)]
                results[f"{regime}/{method}-{name}"] = {**merge_runs(runs), "setting": " ".join(extra), "tuning": {}}
                print(f"[gamma-noise] {regime}/{method}-{name} ({' '.join(extra)}) done", flush=True)
    table = [{k: r[k] for k in ("regime", "method", "setting", "win_rate", "ci", "n", "fidelity_vs_base",
                                "diversity_kept")} for r in regime_rows(results)]
    for r in table:
        print(f"{r['regime']:>4} {r['method']:<22} {100 * r['win_rate']:5.1f} ± {100 * r['ci']:4.1f}  "
              f"fid {r['fidelity_vs_base']:.0%}  div {r['diversity_kept']:.0%}  {r['setting']}")
    summary = {"command": "python benchmarks/gamma_noise.py " + " ".join(
        f"--{k} '{v}'" for k, v in (("regimes", args.regimes), ("methods", args.methods),
                                     ("variants", args.variants), ("seeds", args.seeds))),
        "commit": commit(), "machine": machine(), "minutes": round((time.perf_counter() - start) / 60, 1),
        "rows": table}
    (out / "gamma-noise.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
