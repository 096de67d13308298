"""The toy shapes world: prompts, renderer, judges, and the shipped tiny Stable Diffusion pipeline."""
from __future__ import annotations

from pathlib import Path


def weights_dir() -> Path:
    """The folder of the shipped, pretrained toy pipeline (diffusers format; load with
    StableDiffusionPipeline.from_pretrained)."""
    return Path(__file__).resolve().parent / "weights"
