"""`dkto cache`: encode a feedback set's images (VAE posterior mean and std) and prompts once, for every run after.

The format and the reader live in :mod:`diffusion_kto.data.cache`; this module joins it to a config and a model
family. :func:`cache_key` is the one place that says what a cache must match for a run to use it."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..data.cache import CacheKey, row_prompts, write_cache
from ..models import component_fingerprint, load_family, resolve_pretrained, text_components, vae_fingerprint
from ..objectives import build_objective
from .inputs import DTYPES, load_feedback


def cache_key(cfg: Config, *, text: bool) -> CacheKey:
    """The key a cache for this config carries (and a run checks): resolution, flips, model fingerprints."""
    if not cfg.data.center_crop:
        raise ConfigError("data.center_crop=false draws a random crop per draw, which a cache cannot hold; "
                          "set data.center_crop=true to use data.cache (or drop data.cache)")
    pretrained = resolve_pretrained(cfg.model.pretrained)
    fingerprint = lambda part: component_fingerprint(pretrained, cfg.model.revision, part)  # noqa: E731
    return CacheKey(
        resolution=cfg.data.resolution,
        center_crop=True,
        flips=(False, True) if cfg.data.random_flip else (False,),
        model=cfg.model.pretrained,
        vae=vae_fingerprint(cfg.model),  # model.vae's files when set, else the pipeline's vae/
        # the text encoders used (SD3 with model.drop_t5: not T5) and every tokenizer
        text_encoder="".join(fingerprint(part) for part in text_components(cfg)) if text else None,
    )


def build_cache(cfg: Config, out: str | Path, *, text: bool = True, overwrite: bool = False, shard_size: int = 1024,
                batch_size: int = 16, progress=print) -> Path:
    """Write the cache of ``cfg``'s feedback (data.path, resolution, flips, model) into ``out``; returns the manifest."""
    import shutil

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace the cache there")
    rows = load_feedback(cfg).rows
    key = cache_key(cfg, text=text)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    family = load_family(cfg, weight_dtype=DTYPES[cfg.train.mixed_precision], device=device, with_reference=False,
                         components=("vae", "text_encoder") if text else ("vae",))
    objective = build_objective(cfg)  # the prompts as the objective conditions them (CSFT: both phrasings)
    prompts = objective.prompts_used(row_prompts(rows, caption_dropout=cfg.data.caption_dropout)) if text else ()
    encode = (lambda batch: family.encode_prompts(batch).tensors()) if text else None  # noqa: E731
    shutil.rmtree(out, ignore_errors=True)  # --overwrite: no shard of an older cache survives beside the new one
    return write_cache(out, rows, key, moments=family.latent_moments, text=encode,
                       prompts=prompts, shard_size=shard_size, batch_size=batch_size, progress=progress)
