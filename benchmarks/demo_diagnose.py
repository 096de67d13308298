"""Where does the demo's aligned model fall short: the judge's components on training vs held-out prompts, base vs
aligned (benchmarks/results/demo-sweep.md, "Diagnosis").

    OMP_NUM_THREADS=1 python benchmarks/demo_diagnose.py [UNET_FOLDER ...]   (default runs/demo/model; env DIAG_OUT)

Held-out split: exactly the demo's evaluation images (9 held-out prompts x 8 seed groups x 5 images, seed 0).
Training split: the 45 training prompts x 8 images with seeds 20_000_000 + i (disjoint from the feedback seeds
and the evaluation seeds). Per split and model: mean preference score, liked share (score >= 0.85), the mean of
each of the judge's six factors, the share of images where the factor is >= 0.85 ("pass"), and, among images that
are not liked, which factor is the smallest ("bottleneck"). Base results are cached in DIAG_OUT."""
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np

from diffusion_kto.sampling import generate, load_pipeline
from diffusion_kto.toy import judges, world
from diffusion_kto.apps.demo import SAMPLING, DemoSettings, eval_images

TH = 0.85
# the six factors of the preference judge, each through its public score
FACTOR_SCORES = {"colour": judges.colour_score, "shape": judges.shape_score, "background": judges.background_score,
                 "centring": judges.centring_score, "sharpness": judges.sharpness_score, "clean": judges.clean_score}
FACTORS = tuple(FACTOR_SCORES)
OUT = Path(os.environ.get("DIAG_OUT", "runs/diagnose"))


def split_images(pipe, split: str):
    if split == "held-out":
        images, prompts, _ = eval_images(pipe, DemoSettings())
        return images, prompts
    prompts = [p for p in world.train_prompts() for _ in range(8)]
    seeds = [20_000_000 + i for i in range(len(prompts))]
    return generate(pipe, prompts, seeds, batch_size=64, **SAMPLING), prompts


def measure(images, prompts) -> dict:
    f = {name: fn(images, prompts) for name, fn in FACTOR_SCORES.items()}
    score = judges.preference(images, prompts)
    return {"score": score, "prompts": list(prompts), **f}


def summary(m: dict) -> dict:
    score = np.asarray(m["score"])
    liked = score >= TH
    stack = np.stack([m[k] for k in FACTORS], axis=1)  # (N, 6)
    worst = np.argmin(stack, axis=1)
    row = {"n": len(score), "mean": float(score.mean()), "liked": float(liked.mean())}
    for i, k in enumerate(FACTORS):
        row[f"{k}_mean"] = float(stack[:, i].mean())
        row[f"{k}_pass"] = float((stack[:, i] >= TH).mean())
        row[f"{k}_bottleneck"] = float(((worst == i) & ~liked).mean())  # share of all images
    return row


def per_prompt(m: dict) -> dict:
    score, prompts = np.asarray(m["score"]), np.asarray(m["prompts"])
    return {p: float((score[prompts == p] >= TH).mean()) for p in dict.fromkeys(m["prompts"])}


def main(models: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = {}
    for model in ["base", *models]:
        for split in ("training", "held-out"):
            cache = OUT / f"{model.replace('/', '_')}_{split}.pkl"
            if not cache.exists():
                pipe = load_pipeline("toy", device="cpu", **({} if model == "base" else {"unet": model}))
                pickle.dump(measure(*split_images(pipe, split)), open(cache, "wb"))
            m = pickle.load(open(cache, "rb"))
            rows[(model, split)] = summary(m)
            if split == "held-out":
                print(model, "held-out liked share per prompt:",
                      {k: round(v, 2) for k, v in per_prompt(m).items()})
    head = ["model", "split", "mean", "liked"] + [f"{k} mean/pass/bottleneck" for k in FACTORS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (model, split), r in rows.items():
        cells = [model, split, f"{r['mean']:.3f}", f"{r['liked']:.1%}"] + [
            f"{r[k + '_mean']:.2f} / {r[k + '_pass']:.0%} / {r[k + '_bottleneck']:.0%}" for k in FACTORS]
        print("| " + " | ".join(cells) + " |")
    with open(OUT / "summary.jsonl", "a") as fh:
        for (model, split), r in rows.items():
            fh.write(json.dumps({"model": model, "split": split, **r}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/demo/model"])
