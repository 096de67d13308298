"""Measure a toy pipeline: sample the grammar's prompts and score the images with the toy judges.

Used to write the numbers in weights/README.md (base fidelity and liked share) and to check a fine-tuned
pipeline the same way: ``python -m diffusion_kto.toy.measure [PIPELINE_DIR] [--n 512]``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_kto.toy import judges, weights_dir, world


def sample(pipe, prompts: list[str], steps: int = 20, guidance: float = 4.0, seed: int = 0,
           batch_size: int = 64) -> list:
    """32x32 images of the prompts, batch by batch; batch k draws its noise from seed + k."""
    images = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        with torch.no_grad():
            out = pipe(prompts[start:start + batch_size], height=world.SIZE, width=world.SIZE,
                       num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(seed + k))
        images.extend(out.images)
    return images


def score(images, prompts: list[str], threshold: float = 0.5) -> dict[str, float]:
    """Mean of every built-in judge, share of images at or above threshold for each, and the liked share."""
    array = judges.to_array(images)
    result = {}
    for name, judge in judges.JUDGES.items():
        scores = judge(array, prompts)
        result[f"{name}_mean"] = float(scores.mean())
        result[f"{name}_pass"] = float(np.mean(scores >= threshold))
    result["liked_share"] = result[f"{judges.DEFAULT_JUDGE}_pass"]
    return result


def measure(pipe, prompts: list[str], n: int = 512, steps: int = 20, guidance: float = 4.0,
            seed: int = 0) -> dict[str, float]:
    """Sample n images cycling through prompts and score them; adds the sampling wall time."""
    cycled = [prompts[i % len(prompts)] for i in range(n)]
    start = time.perf_counter()
    images = sample(pipe, cycled, steps, guidance, seed)
    result = score(images, cycled)
    result.update(n=n, steps=steps, guidance=guidance, seed=seed,
                  sample_seconds=round(time.perf_counter() - start, 1))
    return result


def main(argv: list[str] | None = None) -> None:
    """Print the measurements of a pipeline folder on the train and held-out prompts as JSON."""
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", nargs="?", default=str(weights_dir()))
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(Path(args.pipeline))
    pipe.set_progress_bar_config(disable=True)
    report = {split: measure(pipe, prompts, args.n, args.steps, args.guidance, args.seed)
              for split, prompts in (("train", world.train_prompts()), ("eval", world.eval_prompts()))}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
