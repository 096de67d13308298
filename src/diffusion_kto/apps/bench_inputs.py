"""What `dkto bench step` trains on: random-noise feedback, the pairs formed from it (the dpo mode) and its
`dkto cache` (``--cached``), each beside the feedback file in the benchmark's temporary folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def write_feedback(folder: Path, resolution: int, n: int = 16, seed: int = 0) -> Path:
    """Random-noise RGB images with alternating like/dislike labels, as a feedback.jsonl the trainer reads."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["red", "green", "blue", "circle", "square", "triangle"]
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        prompt = f"a {words[i % 3]} {words[3 + i % 3]}"
        lines.append(json.dumps({"image": f"{i}.png", "prompt": prompt, "label": i % 2 == 0}))
    path = folder / "feedback.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def native_resolution(pretrained: str) -> int:
    """The VAE's sample_size of a local diffusers folder (512 when it cannot be read)."""
    from ..models import resolve_pretrained

    config = Path(resolve_pretrained(pretrained)) / "vae" / "config.json"
    try:
        size = json.loads(config.read_text()).get("sample_size", 512)
    except (OSError, ValueError):
        return 512
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def pairs_path(feedback: Path) -> Path:
    """Where :func:`write_pairs_data` puts the pairs of a feedback file: ``pairs/pairs.jsonl`` beside it."""
    return feedback.parent / "pairs" / "pairs.jsonl"


def write_pairs_data(feedback: Path) -> Path:
    """The pairs.jsonl of every same-prompt liked x disliked pair of a feedback file (what `dkto convert to-pairs`
    writes), at :func:`pairs_path`, for the paired modes."""
    from ..data import read_feedback
    from ..data.pairs import feedback_to_pairs, write_pairs

    return write_pairs(feedback_to_pairs(read_feedback(feedback), None), pairs_path(feedback).parent)


def cache_path(feedback: Path) -> Path:
    """Where :func:`write_cache` puts the `dkto cache` of a feedback file: ``cache/`` beside it."""
    return feedback.parent / "cache"


def write_cache(overrides: list[str], feedback: Path) -> Path:
    """`dkto cache` of the feedback under a mode's config ``overrides`` (latents and every text embedding the losses
    use) at :func:`cache_path`, in a subprocess so that the calling process holds no weights while the modes run."""
    cmd = [sys.executable, "-m", "diffusion_kto.cli", "cache", *overrides, "--out", str(cache_path(feedback))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"dkto cache for the benchmark failed:\n{proc.stderr[-3000:]}")
    return cache_path(feedback)
