"""Crash-safe checkpoints: written to a temporary folder, then renamed into place, rotated, with a manifest.

A checkpoint folder ``checkpoint-<step>`` holds ``weights.safetensors`` (trainable weights), ``optimizer.pt`` and
``scheduler.pt`` (the LR schedule, and every process's random states and metrics not yet logged; both loaded with
``weights_only=True``), ``state.json`` (step, micro-step and counters) and ``manifest.json`` (step, resolved config,
package versions, file hashes). A folder without a valid manifest is incomplete."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    """Versions of the packages that shape a checkpoint."""
    import importlib.metadata as md

    out = {}
    for name in ("diffusion-kto", "torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int,
) -> Path:
    """Atomically write ``root/checkpoint-<step>`` and keep only the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(weights, str(tmp / "weights.safetensors"))
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(scheduler, tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
    manifest = {"step": step, "files": files, "versions": _versions(), "config": config}
    with open(tmp / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():  # a re-run of the same step after a resume: replace it atomically
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    _rotate(root, keep)
    return final


def _rotate(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and stale temporary folders."""
    for stale in root.glob(f".tmp-{PREFIX}*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    complete = list_checkpoints(root, verify=False)
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def is_complete(path: Path, *, verify: bool = True) -> bool:
    """A checkpoint is complete when its manifest parses and (with verify) every listed file matches its hash."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, digest in files.items():
        f = path / name
        if not f.is_file() or (verify and _sha256(f) != digest):
            return False
    return True


def list_checkpoints(root: str | Path, *, verify: bool = False) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    return [p for p in found if is_complete(p, verify=verify)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete, hash-verified checkpoint; incomplete or corrupt ones are skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        return None
    for path in sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), reverse=True):
        if is_complete(path, verify=True):
            return path
        log.warning("skipping incomplete or corrupt checkpoint %s", path)
    return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (weights via safetensors, the rest weights_only)."""
    path = Path(path)
    if not is_complete(path, verify=True):
        raise ValueError(f"checkpoint {path} is incomplete or corrupt (manifest missing or file hashes differ)")
    return {
        "weights": load_file(str(path / "weights.safetensors")),
        "optimizer": _load_plain(path / "optimizer.pt"),
        "scheduler": _load_plain(path / "scheduler.pt"),
        "state": json.loads((path / "state.json").read_text()),
        "manifest": json.loads((path / MANIFEST).read_text()),
    }


def _load_plain(path: Path) -> Any:
    """A ``torch.save`` file of tensors and plain values, loaded with ``weights_only=True``: a file that holds any
    other pickled object is refused before that object's code can run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        what = f"e.g. {found.group(1)}" if found else "not only tensors and plain values"
        raise CheckpointError(
            f"train.resume: {path.parent}: {path.name} holds pickled Python objects ({what}); refusing to load it "
            "(torch.load with weights_only=True). Resume from a checkpoint this project wrote, or start without "
            "train.resume") from None


class CheckpointError(ConfigError):
    """A checkpoint that train.resume names cannot be used safely; the message names the file."""
