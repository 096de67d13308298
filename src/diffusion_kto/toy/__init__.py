"""The toy shapes world: prompts, renderer, judges, and the shipped tiny pipelines (Stable Diffusion, and a
flow-matching SD3-format one).

Registered under the names ``toy`` and ``toy-flow`` (pyproject.toml entry points): the model aliases
(:func:`weights_dir`, :func:`flow_weights_dir`), the judge provider (``judges.JUDGES``) and the held-out prompt set
(``world.eval_prompts``)."""
from __future__ import annotations

from pathlib import Path

# `dkto toy pretrain --family F`: the module whose pretrain(out_dir, seed, threads) trains that toy from scratch
PRETRAINERS = {"sd": "diffusion_kto.toy.pretrain", "flow": "diffusion_kto.toy.flow_pretrain"}


def weights_dir() -> Path:
    """The folder of the shipped, pretrained toy pipeline (diffusers format; load with
    StableDiffusionPipeline.from_pretrained)."""
    return Path(__file__).resolve().parent / "weights"


def flow_weights_dir() -> Path:
    """The folder of the shipped, pretrained flow-matching toy pipeline (diffusers format; load with
    StableDiffusion3Pipeline.from_pretrained and sample with max_sequence_length=8)."""
    return Path(__file__).resolve().parent / "weights-flow"


def pretrain(family: str, out_dir: str | Path, seed: int = 0, threads: int | None = None) -> Path:
    """Train the ``family`` toy (a key of :data:`PRETRAINERS`) from scratch with its shipped recipe; returns out_dir."""
    import importlib

    return importlib.import_module(PRETRAINERS[family]).pretrain(out_dir=out_dir, seed=seed, threads=threads)
