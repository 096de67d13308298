"""The global random states a resumed run restores: python's `random`, numpy's global generator, torch's CPU generator
and every CUDA device's (LoRA dropout on a GPU draws from those). Kept per process in a checkpoint's ``scheduler.pt``,
which is read with ``weights_only=True``: every state is stored as tensors, ints, floats and None, never as an ndarray
or another pickled object."""
from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    """This process's random states: {"python", "numpy", "torch", "cuda"} (cuda: the state of this process's current
    device, which its LoRA dropout draws from; None when the process has not used CUDA)."""
    version, internal, gauss = random.getstate()  # (3, 625 ints of the Mersenne Twister, cached gaussian or None)
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # ("MT19937", (624,) uint32, int, int, float)
    return {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def restore(state: dict) -> None:
    """Set the random states of :func:`capture` (the CUDA one on this process's current device)."""
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if isinstance(state.get("cuda"), torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_processes(scheduler: dict, accelerator) -> list[dict]:
    """Restore this process's random states from a checkpoint's scheduler state and return its metrics not yet logged
    (the main process's random states and no metrics when the process count changed; torch's CPU state alone from
    checkpoints that predate the per-process states)."""
    processes = scheduler.get("processes")
    if not processes:
        torch.set_rng_state(scheduler["torch_rng"])
        return []
    same = len(processes) == accelerator.num_processes
    mine = processes[accelerator.process_index if same else 0]
    restore(mine["rng"])
    return list(mine["window"]) if same else []
