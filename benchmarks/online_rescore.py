"""A tighter held-out evaluation of the finished arms of benchmarks/online.py: every arm's final model and the base
again, on more seed groups per held-out prompt and on fresh seeds (none of those the loop's own evaluations used).

    python benchmarks/online_rescore.py OUT [--groups 8] [--arms ...]

The loop's evaluation (``--groups 2``: 9 held-out prompts x 2 groups = 18 median-of-5 comparisons per seed) gives
95% intervals of about +-20 points per seed; 8 groups give 72 comparisons per seed. The evaluation seed of run seed
``s`` is ``50 + s`` (apps/demo.eval_images: seeds 10,000,000 + 100,000 x (50 + s) + ...), disjoint from the loop's.
Writes OUT/rescore-g<groups>/<key>.json (resumable: finished ones are kept) and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from diffusion_kto.apps.demo import DemoSettings, demo_judge, judge_model
from diffusion_kto.evaluation import winrate
from diffusion_kto.provenance import commit, machine
from diffusion_kto.sampling import load_pipeline

EVAL_SEED = 50


def final_model(folder: Path) -> Path:
    """The model folder of a loop's last round."""
    rows = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    return folder / f"round-{rows[-1]['round']:03d}" / "model"


def pipeline(weights: Path | None):
    """The base, or the base with a round's LoRA or UNet."""
    if weights is None:
        return load_pipeline("toy")
    if (weights / "pytorch_lora_weights.safetensors").is_file():
        return load_pipeline("toy", lora=str(weights))
    return load_pipeline("toy", unet=str(weights))


def score(path: Path, weights: Path | None, seed: int, groups: int) -> dict:
    """Judge one model on the held-out prompts (cached in ``path``)."""
    if path.is_file():
        return json.loads(path.read_text())
    settings = DemoSettings(model="toy", seed=EVAL_SEED + seed, groups_per_prompt=groups)
    result = judge_model(pipeline(weights), demo_judge("preference"), settings)
    payload = {"scores": result["scores"].tolist(), "mean_score": float(np.mean(result["scores"])),
               "fidelity": result["fidelity"], "diversity": result["diversity"], "model": str(weights),
               "commit": commit(), "machine": machine()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(payload))
    os.replace(path.with_suffix(".tmp"), path)
    return payload


def rescore(out: Path, groups: int, names: list[str] | None) -> list[dict]:
    """Every finished run of the harness (of the arms asked), and the base of each of their seeds."""
    folder = out / f"rescore-g{groups}"
    rows = []
    for path in sorted((out / "results").glob("*.json")):
        run = json.loads(path.read_text())
        if names and run["arm"] not in names:
            continue
        key = path.stem
        base = score(folder / f"base_s{run['seed']}.json", None, run["seed"], groups)
        model = score(folder / f"{key}.json", final_model(out / key), run["seed"], groups)
        rows.append({"arm": run["arm"], "seed": run["seed"], "noise": run["noise"], "beta": run["beta"],
                     "scores": model["scores"], "base": base, "model": model})
        print(f"[rescore] {key}: mean score {model['mean_score']:.3f} (base {base['mean_score']:.3f})", flush=True)
    return rows


def tables(rows: list[dict]) -> str:
    """Win rate over the base pooled over seeds (95% CI), by seed; every arm against kto-offline on the same seeds."""
    lines = ["| arm | seeds | win rate over base, pooled | by seed | vs kto-offline, pooled | by seed | mean score "
             "| fidelity / base | diversity / base |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["arm"], r["seed"]): r for r in rows}
    for arm in sorted({r["arm"] for r in rows}):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        over = [(r["scores"], r["base"]["scores"]) for r in mine]
        paired = [r for r in mine if ("kto-offline", r["seed"]) in by and arm != "kto-offline"]
        vs = [(r["scores"], by[("kto-offline", r["seed"])]["scores"]) for r in paired]
        cells = [pooled(over), each(over, mine), pooled(vs) if vs else "—", each(vs, paired) if vs else "—"]
        means = [np.mean([r["model"][k] / (r["base"][k] if k != "mean_score" else 1) for r in mine])
                 for k in ("mean_score", "fidelity", "diversity")]
        lines.append(f"| {arm} | {len(mine)} | " + " | ".join(cells)
                     + f" | {means[0]:.3f} | {means[1]:.0%} | {means[2]:.0%} |")
    return "\n".join(lines)


def pooled(pairs) -> str:
    """Win rate of A over B over the seeds' comparisons together, with its 95% CI."""
    w = winrate.win_rate(np.concatenate([np.asarray(a, float) for a, _ in pairs]),
                         np.concatenate([np.asarray(b, float) for _, b in pairs]))
    return f"{w.rate:.1%} ± {w.ci:.1%} (n={w.n})"


def each(pairs, runs) -> str:
    """Win rate of A over B seed by seed."""
    return " / ".join(f"s{r['seed']} {winrate.win_rate(np.asarray(a), np.asarray(b)).rate:.1%}"
                      for (a, b), r in zip(pairs, runs))


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--arms", nargs="+", default=None)
    args = parser.parse_args()
    print(tables(rescore(args.out, args.groups, args.arms)))


if __name__ == "__main__":
    main()
