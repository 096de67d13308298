"""Model families. Each family is one file behind :mod:`diffusion_kto.models.base`."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import registry
from ..config import ConfigError
from .base import DiffusionFamily, unwrap
from .stable_diffusion import StableDiffusion

__all__ = ["DiffusionFamily", "StableDiffusion", "component_fingerprint", "load_family", "resolve_pretrained", "unwrap"]


def resolve_pretrained(name: str) -> str:
    """A model alias registered in the ``diffusion_kto.models`` entry points (``toy``: the shipped tiny shapes-world
    pipeline) as its folder; other names (hub ids, folders) pass through. ConfigError when the alias's provider
    cannot be loaded."""
    folder = registry.load(registry.MODELS, name, error=ConfigError)
    return name if folder is None else str(folder())


def _family_of(pretrained: str) -> type:
    """The family class for a pipeline folder or hub id (from model_index.json when it is local)."""
    index = Path(pretrained) / "model_index.json"
    if index.is_file():
        import json

        cls = json.loads(index.read_text()).get("_class_name", "")
        if cls not in ("StableDiffusionPipeline", ""):
            raise ValueError(f"{pretrained}: pipeline class {cls!r} is not supported yet (supported: StableDiffusionPipeline)")
    return StableDiffusion


def component_fingerprint(pretrained: str, revision: str | None, component: str) -> str:
    """sha256 over the names and bytes of every file in a pipeline's ``component`` folder (e.g. ``vae``).

    What a cache of that component's outputs is keyed by: new weights, config or variant files change it. Hub ids
    are resolved to their local snapshot (downloading the folder when it is not there and the hub is reachable)."""
    import hashlib

    root = Path(resolve_pretrained(pretrained))
    if not (root / component).is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(pretrained, revision=revision, allow_patterns=[f"{component}/*"]))
    folder = root / component
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no files to fingerprint (is {pretrained!r} a diffusers pipeline?)")
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_family(cfg, *, weight_dtype: torch.dtype, device: torch.device | str, with_reference: bool = True,
                components: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> DiffusionFamily:
    """Build the model family described by a :class:`~diffusion_kto.config.Config` (only ``components`` loaded)."""
    pretrained = resolve_pretrained(cfg.model.pretrained)
    family = _family_of(pretrained)
    return family.from_pretrained(
        pretrained,
        revision=cfg.model.revision,
        variant=cfg.model.variant,
        components=components,
        lora_rank=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        lora_target_modules=tuple(cfg.lora.target_modules),
        weight_dtype=weight_dtype,
        device=device,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        with_reference=with_reference,
    )
