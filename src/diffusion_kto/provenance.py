"""Where a result came from: the source commit and the machine, written beside every reported number."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch


@functools.cache
def commit() -> str:
    """The short git commit of the installed source ('+dirty' with uncommitted changes), or 'unknown'; the answer of
    the first call in a process, so a run that calls it when it starts records the code it ran, not a later HEAD."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else "unknown"


def machine() -> str:
    """A one-line description of this machine (processor, cores, accelerator, torch)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} {os.cpu_count()}-core CPU, {device}, {platform.system()}, torch {torch.__version__}"
