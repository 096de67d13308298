"""Models of `dkto eval` as written on its command line: ``NAME=BASE[+lora:DIR | +unet:DIR | +DIR]``, checked
against what the adapter folder holds, and fingerprinted by the hashes of its weight files."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
HASH_LIMIT = 256 * 2**20  # weight files up to this size are hashed whole; larger ones by size and ends


class EvalError(UserError, ValueError):
    """A problem with the evaluation's inputs or output folder, stated so that the user can fix it."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: a base pipeline plus an optional LoRA folder or UNet folder."""

    name: str
    base: str
    lora: str | None = None
    unet: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """From 'NAME=BASE[+lora:DIR|+unet:DIR|+DIR]'; NAME defaults to the adapter's or base's last path part."""
        name, sep, rest = text.partition("=")
        if not sep:
            name, rest = "", text
        base, plus, adapter = rest.partition("+")
        base, adapter = base.strip(), adapter.strip()
        if not base:
            raise EvalError(f"model {text!r}: no base pipeline; write NAME=BASE[+lora:DIR|+unet:DIR]")
        lora = unet = None
        if plus:
            kind, colon, folder = adapter.partition(":")
            if colon and kind in ("lora", "unet"):
                lora, unet = (folder, None) if kind == "lora" else (None, folder)
            else:
                lora, unet = detect_adapter(adapter, text)
            if not (lora or unet):
                raise EvalError(f"model {text!r}: nothing after '+'; write +lora:DIR or +unet:DIR")
        name = name.strip() or Path((lora or unet or base).rstrip("/")).name or base
        return cls(_check_name(name, text), base, lora, unet)

    def describe(self) -> str:
        """The spec written back as text."""
        extra = f"+lora:{self.lora}" if self.lora else f"+unet:{self.unet}" if self.unet else ""
        return f"{self.name}={self.base}{extra}"

    def validate(self) -> None:
        """EvalError unless the adapter folder exists and holds what its kind needs."""
        if self.lora and not (Path(self.lora) / LORA_FILE).is_file() and not Path(self.lora).is_file():
            raise EvalError(f"model {self.name!r}: no {LORA_FILE} in {self.lora}")
        if self.unet and not _unet_dir(Path(self.unet)):
            raise EvalError(f"model {self.name!r}: {self.unet} is not a UNet folder (no config.json or unet/config.json)")

    def fingerprint(self) -> dict:
        """Hashes of the adapter weights, so that a retrained LoRA or UNet is not mistaken for the old one."""
        folder = Path(self.lora or self.unet or "")
        if not (self.lora or self.unet):
            return {}
        files = [folder] if folder.is_file() else sorted(
            p for p in (_unet_dir(folder) or folder).iterdir() if p.suffix in (".safetensors", ".bin"))
        return {p.name: file_digest(p) for p in files}


def _check_name(name: str, text: str) -> str:
    """name if it is usable as a folder name; EvalError otherwise."""
    if not name or any(c in name for c in "/\\:") or name in (".", ".."):
        raise EvalError(f"model {text!r}: the name {name!r} must be a plain word (no / \\ or :)")
    return name


def _unet_dir(folder: Path) -> Path | None:
    """The UNet (or SD3 / Flux transformer) folder inside a run folder, or the folder itself; None when none holds a
    config.json."""
    for cand in (folder / "unet", folder / "transformer", folder):
        if (cand / "config.json").is_file():
            return cand
    return None


def detect_adapter(folder: str, text: str) -> tuple[str | None, str | None]:
    """(lora, unet) for a '+DIR' adapter, from what the folder holds."""
    path = Path(folder)
    if (path / LORA_FILE).is_file():
        return folder, None
    if _unet_dir(path):
        return None, folder
    raise EvalError(f"model {text!r}: {folder} holds neither {LORA_FILE} nor a UNet (config.json); "
                    "write +lora:DIR or +unet:DIR")


def file_digest(path: Path) -> str:
    """sha256 of a file; for files over HASH_LIMIT, of its size and first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= HASH_LIMIT:
            for chunk in iter(lambda: fh.read(2**20), b""):
                h.update(chunk)
        else:
            h.update(str(size).encode())
            h.update(fh.read(2**20))
            fh.seek(-(2**20), os.SEEK_END)
            h.update(fh.read(2**20))
    return h.hexdigest()[:16]
