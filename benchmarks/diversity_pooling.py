"""Is the diversity a demo run loses grain or layout? (benchmarks/results/guards.md)

    python benchmarks/diversity_pooling.py RUN [--steps 400 200 50]

For the base model and each checkpoint of a `dkto demo` folder RUN, draw the guard's images (apps/guard_rollback.py)
and measure their diversity (apps/reward_guards.diversity) on the full images and after k × k average pooling, k = 2,
4, 8. Pooling wipes out pixel grain but keeps where shapes sit and what colour they are: if the checkpoint's ratio to
the base stays the same after pooling, the lost diversity is in the layouts, not in the noise."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from diffusion_kto.apps.demo import DemoSettings
from diffusion_kto.apps.guard_rollback import GuardPlan, guard_set
from diffusion_kto.apps.reward_guards import diversity
from diffusion_kto.provenance import commit, machine
from diffusion_kto.sampling import generate, load_pipeline

POOLS = (1, 2, 4, 8)


def pooled(images, k: int) -> list[np.ndarray]:
    """Each image averaged over k x k pixel blocks, (H/k, W/k, 3) uint8-scaled floats."""
    out = []
    for im in images:
        x = np.asarray(im, dtype=np.float32)  # (H, W, 3)
        h, w, c = x.shape
        out.append(x.reshape(h // k, k, w // k, k, c).mean((1, 3)))
    return out


def load_checkpoint(pipe, run: Path, step: int) -> None:
    """Put a demo checkpoint's UNet weights into ``pipe`` (every key must exist)."""
    weights = load_file(run / "model" / "checkpoints" / f"checkpoint-{step:08d}" / "weights.safetensors")
    state = pipe.unet.state_dict()
    missing = [k for k in weights if k not in state]
    if missing:
        raise SystemExit(f"{run}: checkpoint {step} has keys the toy UNet lacks, e.g. {missing[0]}")
    pipe.unet.load_state_dict({**state, **{k: v.to(state[k].dtype) for k, v in weights.items()}})


def main() -> None:
    """Diversity at every pooling size for the base and each asked checkpoint, with ratios to the base."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--steps", type=int, nargs="+", default=[400, 200, 50])
    args = ap.parse_args()
    plan = GuardPlan()
    prompts, seeds = guard_set(0, plan)
    pipe = load_pipeline("toy", device="cpu")
    result = {"command": f"python benchmarks/diversity_pooling.py {args.run} --steps {' '.join(map(str, args.steps))}",
              "commit": commit(), "machine": machine(), "pools": list(POOLS)}
    for step in [0, *args.steps]:
        if step:
            load_checkpoint(pipe, args.run, step)
        images = generate(pipe, prompts, seeds, batch_size=64, **DemoSettings().sampling)
        result[str(step)] = [diversity(pooled(images, k), plan.images) for k in POOLS]
        ratios = [a / b for a, b in zip(result[str(step)], result["0"])]
        print(f"step {step or 'base'}: diversity {['%.4f' % v for v in result[str(step)]]}, "
              f"ratio to base at pool {list(POOLS)}: {['%.2f' % r for r in ratios]}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
