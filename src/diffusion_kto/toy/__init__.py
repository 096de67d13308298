"""The toy shapes world: prompts, renderer, judges, and the shipped tiny Stable Diffusion pipeline.

Registered under the name ``toy`` (pyproject.toml entry points): the model alias (:func:`weights_dir`), the judge
provider (``judges.JUDGES``) and the held-out prompt set (``world.eval_prompts``)."""
from __future__ import annotations

from pathlib import Path


def weights_dir() -> Path:
    """The folder of the shipped, pretrained toy pipeline (diffusers format; load with
    StableDiffusionPipeline.from_pretrained)."""
    return Path(__file__).resolve().parent / "weights"
