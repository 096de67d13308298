"""The guards that act, measured on full `dkto demo` runs (issue 23 item 5; benchmarks/results/guards.md).

    python benchmarks/guards.py run OUT [--seeds 0 1 2 3 4 5] [--probes reddest greenest] [-- demo flags ...]
    python benchmarks/guards.py summary OUT [--md OUT/guards.md]

``run`` starts, one after another, `dkto demo --seed s --out OUT/pref-s<s>` for every seed (the default judge) and
`dkto demo --judge benchmarks/one_trait_judges.py:<probe> --out OUT/<probe>-s0` for every one-trait probe (a judge
that rewards one colour whatever the prompt asks: reward hacking on purpose), each at the demo's defaults plus the
flags after ``--``; a folder with a metrics.json is kept. ``summary`` reads every OUT/*/metrics.json into one table:
the win rate over the base, the checkpoint the guards kept, and the held-out fidelity and diversity beside the
base's, with the default judge's runs pooled over seeds (their comparisons together)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from diffusion_kto.evaluation import winrate

PROBES = "benchmarks/one_trait_judges.py"


def run(out: Path, seeds: list[int], probes: list[str], extra: list[str]) -> None:
    """Every demo run of the set that has no metrics.json yet, in turn."""
    jobs = [(f"pref-s{s}", ["--seed", str(s)]) for s in seeds]
    jobs += [(f"{p}-s0", ["--judge", f"{PROBES}:{p}"]) for p in probes]
    for name, flags in jobs:
        if (out / name / "metrics.json").is_file():
            continue
        print(f"[guards] dkto demo {' '.join(flags)} --out {out / name}", flush=True)
        subprocess.run([sys.executable, "-m", "diffusion_kto.cli", "demo", *flags, *extra, "--out", str(out / name)],
                       check=True)


def row(name: str, m: dict) -> dict:
    """One run's line: judge, win rate, what the guards did, held-out guards."""
    w, rb = m["win_rate"], m.get("guard_rollback") or {}
    kept = f"{rb.get('chosen_step')} of {rb.get('final_step')}" if rb else "final (no rollback)"
    if rb.get("alpha") is not None:  # the chord guard: alpha of the way from the base to the final step
        kept = f"alpha {rb['alpha']:g} to step {rb['final_step']}"
    return {"run": name, "win rate over base": f"{w['rate']:.1%} ± {w['ci']:.1%} (n={w['n']})", "kept": kept,
            "held-out fidelity / base": f"{m['guard']['ratios']['fidelity']:.0%}",
            "held-out diversity / base": f"{m['guard']['ratios']['diversity']:.0%}",
            "held-out guards": "passed" if m["guard"]["passed"] else "FAILED " + ",".join(m["guard"]["failed"]),
            "checked (step: fidelity bound, diversity on guard images)": "; ".join(
                f"{c.get('step', c.get('alpha'))}: {c['ratios']['fidelity']:.0%}, {c['ratios']['diversity']:.0%}"
                for c in rb.get("checked", []))}


def pooled(metrics: list[dict]) -> str:
    """The runs' comparisons together: (wins + ties / 2) / n with its 95% interval."""
    wins, ties, n = (sum(m["win_rate"][k] for m in metrics) for k in ("wins", "ties", "n"))
    w = winrate.proportion(wins, ties, n)
    return f"{w.rate:.1%} ± {w.ci:.1%} (n={w.n}, {len(metrics)} feedback seeds)"


def summary(out: Path, md: Path) -> None:
    """The table of every finished run, and the default judge's pooled win rate."""
    runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/metrics.json"))}
    rows = [row(name, m) for name, m in runs.items()]
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    pref = [m for name, m in runs.items() if name.startswith("pref-")]
    text = "\n".join(lines) + (f"\n\nDefault judge, pooled: {pooled(pref)}\n" if pref else "\n")
    md.write_text(text)
    print(text)


def main() -> None:
    """run or summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4, 5])
    r.add_argument("--probes", nargs="*", default=["reddest", "greenest"])
    s = sub.add_parser("summary")
    s.add_argument("out", type=Path)
    s.add_argument("--md", type=Path, default=None)
    args, extra = ap.parse_known_args()
    if args.cmd == "run":
        run(args.out, args.seeds, args.probes, [e for e in extra if e != "--"])
    else:
        summary(args.out, args.md or args.out / "guards.md")


if __name__ == "__main__":
    main()
