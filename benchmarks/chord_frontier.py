"""Early stopping or weight interpolation: which keeps more of a demo run's gain at the diversity the guard allows?

    python benchmarks/chord_frontier.py RUN [RUN ...] [--alphas 0.3 0.4 0.5 0.6 0.7 0.8] [--out FILE.json]

For each finished `dkto demo` folder RUN (its checkpoints kept, as the guards keep them), draw the guard's images
(apps/guard_rollback.py: training prompts, seeds of their own) for the base, for every checkpoint (the early-stopping
path the guard walks today) and for points on the chord from the base to the final weights,
θ_α = θ_0 + α (θ_T − θ_0) (a weight-space ensemble of base and fine-tuned model, as in WiSE-FT, Wortsman et al. 2022,
Eq. 1). For each point: the run's judge's mean score (`preference`), the fidelity lower bound and the diversity, as
ratios to the base's, and the same for uniform averages of the checkpoints from a step on (latest weight averaging,
Kaddour 2022). The question is which path scores higher at the same diversity kept."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from diffusion_kto.apps.demo import DemoSettings
from diffusion_kto.apps.guard_rollback import GuardPlan, checkpoint_step, chord, fidelity_bound, guard_set
from diffusion_kto.apps.reward_guards import diversity
from diffusion_kto.provenance import commit, machine
from diffusion_kto.sampling import generate, load_pipeline
from diffusion_kto.toy import judges
from diffusion_kto.train.checkpoint import list_checkpoints


def checkpoint_weights(run: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Every kept checkpoint of a demo run's UNet, by step."""
    folders = list_checkpoints(run / "model" / "checkpoints")
    if not folders:
        raise SystemExit(f"{run}: no checkpoints (run the demo with its guards on)")
    return {checkpoint_step(f): load_file(f / "weights.safetensors") for f in folders}


def point(pipe, plan: GuardPlan, seed: int, base: dict | None = None) -> dict:
    """The guard images' preference score, fidelity (mean and paired lower bound) and diversity for one model."""
    prompts, seeds = guard_set(seed, plan)
    images = generate(pipe, prompts, seeds, batch_size=64, **DemoSettings().sampling)
    fid = np.asarray(judges.fidelity(images, prompts), dtype=float)
    out = {"preference": float(np.mean(judges.preference(images, prompts))), "fidelity": float(fid.mean()),
           "diversity": diversity(images, plan.images), "_fid": fid}
    if base is not None:
        out["fidelity_bound"] = fidelity_bound(fid, base["_fid"], plan.z)
        out["ratios"] = {"preference": out["preference"] / base["preference"],
                         "fidelity_bound": out["fidelity_bound"] / base["fidelity"],
                         "diversity": out["diversity"] / base["diversity"]}
    return out


def frontier(run: Path, alphas: list[float]) -> dict:
    """The base, every checkpoint and every chord point of one run, on its guard images."""
    seed = json.loads((run / "metrics.json").read_text())["settings"]["seed"]
    plan, pipe = GuardPlan(), load_pipeline("toy", device="cpu")
    theta0 = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = point(pipe, plan, seed)
    ckpts = checkpoint_weights(run)
    final = ckpts[max(ckpts)]
    averages = [(f"mean of steps >= {s}", [w for t, w in ckpts.items() if t >= s]) for s in sorted(ckpts)[::3][:-1]]
    rows = []
    for label, weights in [*((f"step {s}", w) for s, w in ckpts.items()),
                           *((f"alpha {a:g}", chord(theta0, final, a)) for a in alphas),
                           *((name, {k: torch.stack([w[k] for w in ws]).mean(0) for k in final}) for name, ws in averages)]:
        pipe.unet.load_state_dict({**theta0, **{k: v.to(theta0[k].dtype) for k, v in weights.items()}})
        p = point(pipe, plan, seed, base)
        rows.append({"point": label, **{k: round(v, 4) for k, v in p["ratios"].items()}})
        print(f"{run.name} {label}: " + ", ".join(f"{k} {v:.1%}" for k, v in p["ratios"].items()), flush=True)
    return {"run": str(run), "seed": seed, "base": {k: v for k, v in base.items() if k != "_fid"}, "rows": rows}


def main() -> None:
    """Every run's frontier, printed and written as one json file."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = {"command": "python benchmarks/chord_frontier.py " + " ".join(map(str, args.runs))
              + f" --alphas {' '.join(map(str, args.alphas))}", "commit": commit(), "machine": machine(),
              "runs": [frontier(run, args.alphas) for run in args.runs]}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
