"""Where training metrics and the run summary go: the progress bar, ``metrics.jsonl`` and ``summary.json`` in the run
folder, and accelerate trackers (TensorBoard, W&B)."""
from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError


@dataclass
class TrainResult:
    """Summary of a finished run."""

    output_dir: Path
    steps: int
    exported: list[str]
    seconds: float
    images_per_second: float
    skipped_steps: int
    main_process: bool = True
    data: Any = None  # FeedbackSummary: rows trained on and bad rows skipped (None: rows were passed in, or streamed)
    data_wait_seconds: float = 0.0  # time the loop spent waiting for the next batch (loading, decoding, collating)


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


def nanmean(values: list[float]) -> float:
    """Mean of the finite values, NaN when there are none."""
    finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def reduce_window(accelerator, window: list[dict[str, float]]) -> dict[str, float]:
    """The finite mean of every metric over a log window's micro-steps, averaged over processes (a collective call)."""
    keys = sorted({k for m in window for k in m if k != "finite"})
    local = torch.tensor([nanmean([m.get(k, math.nan) for m in window]) for k in keys], device=accelerator.device)
    values = accelerator.reduce(local, reduction="mean") if accelerator.num_processes > 1 else local
    return {k: float(v) for k, v in zip(keys, values.tolist())}


def write_summary(out: Path, result: TrainResult, **extra: Any) -> None:
    """``summary.json`` in the run folder: steps, loop seconds, images/s and time waiting on data (main process)."""
    if not result.main_process:
        return
    summary = {"steps": result.steps, "seconds": round(result.seconds, 3),
               "images_per_second": round(result.images_per_second, 3),
               "data_wait_seconds": round(result.data_wait_seconds, 3),
               "data_wait_share": round(result.data_wait_seconds / max(result.seconds, 1e-9), 4),
               "skipped_steps": result.skipped_steps, **extra}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def require_tracker(report_to: str | None) -> None:
    """A clear error when log.report_to names a tracker whose package is missing."""
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to or "")
    if package and importlib.util.find_spec(package) is None and not (
        package == "tensorboard" and importlib.util.find_spec("tensorboardX")
    ):
        raise ConfigError(f"log.report_to={report_to} needs the {package} package: pip install {package}")


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config dict to dotted keys with tracker-friendly values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
