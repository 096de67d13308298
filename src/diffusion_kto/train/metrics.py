"""Where training metrics go: the progress bar, ``metrics.jsonl`` in the run folder, and accelerate trackers."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsFile:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Append ``{"step": step, **metrics}``; non-finite values become null."""
        if not self.enabled:
            return
        clean = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **clean}) + "\n")


def postfix(metrics: dict[str, float]) -> dict[str, str]:
    """Short strings for the progress bar."""
    keys = ("loss", "kl", "reward_liked", "reward_disliked", "accuracy")
    return {k: f"{metrics[k]:.4g}" for k in keys if k in metrics}
