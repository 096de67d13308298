"""Demo configs x feedback seeds, in parallel worker processes (CPU or GPU), with a larger held-out evaluation than
the demo's, so that configs can be told apart from the noise of one 72-comparison run.

    python benchmarks/demo_grid.py prepare OUT --seed S [--groups G] [--budget N] [--model toy-flow]
                                                          feedback of `dkto demo --seed S [--model M]` and the
                                                          base's scores on G seed groups (default 32)
    python benchmarks/demo_grid.py work OUT GRID --worker I --workers N  jobs I, I+N, ... of GRID x prepared seeds
    python benchmarks/demo_grid.py summary OUT [--groups 8]              pooled win rate per config, and the share of
                                                                         demo-sized (8-group) slices at >= 80%

GRID is a text file, one config per line: NAME [key=value ...] (overrides of the model's demo config,
configs/toy-kto.yaml or configs/toy-flow-kto.yaml); '#' comments. A folder OUT holds one model's seeds.
Each job writes OUT/results/NAME_sS.json (aligned and base per-image scores, fidelity, diversity) once it is done,
so an interrupted grid resumes where it stopped. Results for benchmarks/results/demo-sweep.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from diffusion_kto.config import load_config
from diffusion_kto.evaluation import winrate
from diffusion_kto.provenance import commit, machine
from diffusion_kto.sampling import load_pipeline
from diffusion_kto.toy import judges
from diffusion_kto.apps.demo import DemoSettings, collect_feedback, judge_model, trained_pipeline
from diffusion_kto.train import DiffusionKTOTrainer


def scores_of(pipe, settings: DemoSettings) -> dict:
    """The demo's per-model evaluation (``judge_model``) under the preference judge, in JSON form."""
    r = judge_model(pipe, judges.preference, settings)
    return {"scores": r["scores"].round(5).tolist(), **{k: r[k] for k in ("fidelity", "diversity", "liked_share")}}


def prepare(out: Path, seed: int, groups: int, budget: int = 1024, model: str = "toy") -> None:
    """The demo's feedback at ``seed`` and the base model's held-out scores."""
    folder = out / f"seed{seed}"
    if (folder / "base.json").is_file():
        return
    settings = DemoSettings(seed=seed, groups_per_prompt=groups, budget=budget, model=model)
    base = load_pipeline(model)
    if folder.exists():
        shutil.rmtree(folder)  # a half-prepared seed from an interrupted run
    feedback = collect_feedback(base, judges.preference, settings, folder / "feedback")
    record = {"seed": seed, "groups": groups, "model": model, "feedback": feedback, **scores_of(base, settings)}
    (folder / "base.json").write_text(json.dumps(record))


def read_grid(path: Path) -> list[tuple[str, list[str]]]:
    """(name, overrides) per non-empty, non-comment line."""
    rows = []
    for line in Path(path).read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            rows.append((words[0], words[1:]))
    return rows


def run_job(out: Path, name: str, overrides: list[str], seed: int) -> None:
    """Train one config on one seed's feedback and score it on that seed's held-out images."""
    base = json.loads((out / f"seed{seed}" / "base.json").read_text())
    model = base.get("model", "toy")
    settings = DemoSettings(seed=seed, groups_per_prompt=base["groups"], model=model)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(settings.config, [f"data.path={out / f'seed{seed}' / 'feedback' / 'feedback.jsonl'}",
                                   f"train.output_dir={tmp}/model", "train.overwrite=true", "log.every=50",
                                   f"train.seed={seed}", *overrides])
        start = time.perf_counter()
        trained = DiffusionKTOTrainer(cfg).train()
        train_s = time.perf_counter() - start
        aligned = trained_pipeline(model, trained)
        record = {"name": name, "overrides": overrides, "seed": seed, "train_s": round(train_s, 1),
                  "commit": commit(), "machine": machine(), **scores_of(aligned, settings)}
    target = out / "results" / f"{name}_s{seed}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    partial.write_text(json.dumps(record))
    os.replace(partial, target)
    wr = winrate.win_rate(np.asarray(record["scores"]), np.asarray(base["scores"]))
    print(f"[grid] {name} seed {seed}: {wr.rate:.1%} of {wr.n} (train {train_s:.0f}s)", flush=True)


def work(out: Path, grid: Path, worker: int, workers: int) -> None:
    """Jobs worker, worker + workers, ... in config-major order, skipping finished ones."""
    seeds = sorted(int(p.name[4:]) for p in out.glob("seed*") if (p / "base.json").is_file())
    jobs = [(name, ovr, s) for name, ovr in read_grid(grid) for s in seeds]
    for name, ovr, s in jobs[worker::workers]:
        if not (out / "results" / f"{name}_s{s}.json").is_file():
            try:
                run_job(out, name, ovr, s)
            except Exception as exc:  # one bad config must not stop this worker's other jobs
                print(f"[grid] {name} seed {s} failed: {type(exc).__name__}: {exc}", flush=True)


def summary(out: Path, slice_groups: int) -> list[dict]:
    """Per config: pooled win rate over seeds, mean of per-seed rates, and the share of demo-sized slices >= 80%."""
    bases = {int(p.parent.name[4:]): json.loads(p.read_text()) for p in out.glob("seed*/base.json")}
    by_name: dict[str, list[dict]] = {}
    for p in sorted((out / "results").glob("*.json")):
        r = json.loads(p.read_text())
        by_name.setdefault(r["name"], []).append(r)
    rows = []
    for name, runs in by_name.items():
        rates, wins, n, slices = [], 0.0, 0, []
        for r in runs:
            b = bases[r["seed"]]
            a, s = np.asarray(r["scores"]), np.asarray(b["scores"])
            wr = winrate.win_rate(a, s)
            rates.append(wr.rate)
            wins += wr.wins + 0.5 * wr.ties
            n += wr.n
            groups = b["groups"]
            per_prompt_a, per_prompt_b = a.reshape(-1, groups, a.shape[-1]), s.reshape(-1, groups, s.shape[-1])
            for g in range(0, groups - slice_groups + 1, slice_groups):  # (prompts, slice_groups, images)
                sl = winrate.win_rate(per_prompt_a[:, g:g + slice_groups].reshape(-1, a.shape[-1]),
                                      per_prompt_b[:, g:g + slice_groups].reshape(-1, s.shape[-1]))
                slices.append(sl.rate)
        pooled = wins / n
        rows.append({"name": name, "overrides": runs[0]["overrides"], "seeds": sorted(r["seed"] for r in runs),
                     "pooled": round(pooled, 4), "ci": round(1.96 * (pooled * (1 - pooled) / n) ** 0.5, 4), "n": n,
                     "per_seed": [round(x, 3) for x in rates],
                     "slices_ge_80": round(float(np.mean(np.asarray(slices) >= 0.8 - 1e-9)), 3) if slices else None,
                     "diversity_ratio": round(float(np.mean([r["diversity"] / bases[r["seed"]]["diversity"]
                                                             for r in runs])), 3),
                     "fidelity": round(float(np.mean([r["fidelity"] for r in runs])), 3),
                     "liked_share": round(float(np.mean([r["liked_share"] for r in runs])), 3),
                     "train_s": round(float(np.mean([r["train_s"] for r in runs])), 1)})
    rows.sort(key=lambda r: -r["pooled"])
    for r in rows:
        print(json.dumps(r))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare"); p.add_argument("out", type=Path); p.add_argument("--seed", type=int, required=True)
    p.add_argument("--groups", type=int, default=32); p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--model", default="toy", help="toy or toy-flow (or a folder in one of their formats)")
    w = sub.add_parser("work"); w.add_argument("out", type=Path); w.add_argument("grid", type=Path)
    w.add_argument("--worker", type=int, default=0); w.add_argument("--workers", type=int, default=1)
    s = sub.add_parser("summary"); s.add_argument("out", type=Path); s.add_argument("--groups", type=int, default=8)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out, args.seed, args.groups, args.budget, args.model)
    elif args.command == "work":
        work(args.out, args.grid, args.worker, args.workers)
    else:
        summary(args.out, args.groups)


if __name__ == "__main__":
    main()
