"""The chord guard on finished demo runs: what `dkto demo --guard-search chord` would have kept, on held-out prompts.

    python benchmarks/chord_guard.py RUN [RUN ...] [--out FILE.json]

A demo run is deterministic up to its guard stage, so the guard can be replayed on its saved final checkpoint: for each
finished `dkto demo` folder RUN (default judge, SD toy), rebuild its training's family, run
`guard_rollback.search_chord` from the base to the final weights on the run's own guard images, and evaluate the
chosen weights on the run's held-out prompts and seeds exactly as the demo does (`demo.evaluate`), beside the
checkpoint guard's choice that the run itself kept (its metrics.json)."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from diffusion_kto.apps.demo import DemoSettings, demo_judge, evaluate, training_config
from diffusion_kto.apps.guard_rollback import GuardPlan, chord, guard_stats, search_chord
from diffusion_kto.evaluation import winrate
from diffusion_kto.provenance import commit, machine
from diffusion_kto.sampling import load_pipeline
from diffusion_kto.train import DiffusionKTOTrainer
from diffusion_kto.train.checkpoint import list_checkpoints, load_checkpoint


def replay(run: Path) -> dict:
    """The chord guard's α and held-out result for one run, and the run's own (checkpoint guard) result."""
    m = json.loads((run / "metrics.json").read_text())
    plan = GuardPlan(search="chord")
    with tempfile.TemporaryDirectory() as tmp:  # the rebuilt training writes nothing into the run
        kept = {k: m["settings"][k] for k in ("seed", "judge", "budget", "threshold", "images_per_prompt",
                                               "groups_per_prompt")}
        settings = DemoSettings(out=run, **kept,
                                overrides=(*m["settings"]["overrides"], f"train.output_dir={tmp}/model"))
        family = DiffusionKTOTrainer(training_config(settings, run)).family
        initial = {k: v.clone() for k, v in family.trainable_state().items()}  # on CPU it aliases the params
        final = load_checkpoint(list_checkpoints(run / "model" / "checkpoints")[-1])["weights"]
        base_pipe = load_pipeline(settings.model, device="cpu")
        base = guard_stats(base_pipe, plan, settings.seed, settings.sampling)
        alpha, checked = search_chord(family, initial, final, base, plan, settings.seed, settings.sampling)
        family.load_trainable_state(chord(initial, final, alpha))
        with family.pipeline() as pipe:
            results = evaluate(base_pipe, pipe, demo_judge(settings.judge), settings)
    wr = winrate.win_rate(results["aligned"]["scores"], results["base"]["scores"])
    ratios = {k: results["aligned"][k] / results["base"][k] for k in ("fidelity", "diversity")}
    row = {"run": run.name, "seed": settings.seed, "alpha": alpha,
           "checked": [{"alpha": c["alpha"], "passed": c["passed"], "ratios": c["ratios"]} for c in checked],
           "chord": {"rate": wr.rate, "ci": wr.ci, "n": wr.n, "wins": wr.wins, "ties": wr.ties, **ratios},
           "checkpoints": {"kept_step": m["guard_rollback"]["chosen_step"], **m["win_rate"], **m["guard"]["ratios"]}}
    print(f"{run.name}: chord alpha {alpha:g} wins {wr.rate:.1%} ± {wr.ci:.1%} (fidelity {ratios['fidelity']:.0%}, "
          f"diversity {ratios['diversity']:.0%}); checkpoint guard kept step {row['checkpoints']['kept_step']}: "
          f"{m['win_rate']['rate']:.1%}", flush=True)
    return row


def main() -> None:
    """Every run replayed, printed, pooled, and written as one json file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = {"command": "python benchmarks/chord_guard.py " + " ".join(map(str, args.runs)), "commit": commit(),
              "machine": machine(), "runs": [replay(run) for run in args.runs]}
    for name in ("chord", "checkpoints"):
        rows = [r[name] for r in result["runs"]]
        w = winrate.proportion(sum(r["wins"] for r in rows), sum(r["ties"] for r in rows), sum(r["n"] for r in rows))
        result[f"pooled_{name}"] = {"rate": w.rate, "ci": w.ci, "n": w.n}
        print(f"pooled, {name} guard: {w.rate:.1%} ± {w.ci:.1%} (n={w.n})", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
