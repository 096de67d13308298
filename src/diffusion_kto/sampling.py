"""Image generation with fixed per-image seeds, batched: the same seeds for every model make comparisons paired."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import ConfigError


def dtype_kwarg(dtype: torch.dtype, diffusers_version: str | None = None) -> dict:
    """The dtype keyword of ``from_pretrained``: ``dtype`` from diffusers 0.40 on, ``torch_dtype`` before it."""
    from packaging.version import Version

    if diffusers_version is None:
        import diffusers

        diffusers_version = diffusers.__version__
    return {"dtype" if Version(diffusers_version).release >= (0, 40) else "torch_dtype": dtype}


def load_pipeline(model: str, *, lora: str | None = None, unet: str | None = None, device: str | None = None,
                  dtype: torch.dtype = torch.float32, allow_pickle: bool = False, key: str = "--model",
                  vae: str | None = None):
    """A diffusers pipeline from a hub id / folder (``toy`` = shipped model), with a LoRA dir or a fine-tuned denoiser
    (``unet``: a UNet or SD3 / Flux transformer folder, or a run folder with ``unet/`` or ``transformer/``) on top, and
    optionally a separate VAE (``vae``: folder or hub id, e.g. an fp16-safe SDXL VAE).

    Safetensors weights only unless ``allow_pickle``; a missing or unreachable model, LoRA, network or VAE is one
    ConfigError naming ``key`` (the flag or config key the name came from; ``--vae`` for the VAE). The sampler is the
    family's (:func:`~diffusion_kto.models.sampling_scheduler`: DDIM for SD 1.x / 2.x and SDXL, the flow-matching
    Euler one for SD3 / Flux)."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    from .models import family_of, resolve_pretrained, sampling_scheduler
    from .models.loading import loading_error, locate, quiet_processor_fallback, weight_kwargs

    if lora and unet:
        raise ValueError("give either a LoRA dir or a UNet / transformer dir, not both")
    path = locate(resolve_pretrained(model), key)
    kwargs = {**dtype_kwarg(dtype), **weight_kwargs(allow_pickle), **family_of(path, key=key).pipeline_kwargs}
    vae_path = None if vae is None else locate(vae, "--vae", marker="config.json")
    try:
        with quiet_processor_fallback():
            if vae_path:
                kwargs["vae"] = AutoencoderKL.from_pretrained(vae_path, **dtype_kwarg(dtype), **weight_kwargs(allow_pickle))
            if unet:
                kwargs.update(_denoiser(unet, path, dtype, allow_pickle))
            pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
        pipe.scheduler = sampling_scheduler(pipe)
        if lora:
            pipe.load_lora_weights(_lora_dir(lora), **weight_kwargs(allow_pickle))
    except Exception as err:
        friendly = loading_error(err, key, model, allow_pickle)
        if friendly is None:
            raise
        raise friendly from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _network_dir(unet: str) -> Path:
    """A UNet / transformer folder, or a run folder holding ``unet/`` or ``transformer/``; ConfigError otherwise."""
    folder = Path(unet).expanduser()
    for cand in (folder / "unet", folder / "transformer", folder):
        if (cand / "config.json").is_file():
            return cand
    raise ConfigError(f"--unet: {unet!r} holds no diffusers UNet or transformer (config.json) and no unet/ or "
                      "transformer/ folder")


def _denoiser(unet: str, pipeline: str, dtype: torch.dtype, allow_pickle: bool) -> dict:
    """{component: network} for a fine-tuned network folder: its ``_class_name`` picks the diffusers class and the
    base pipeline's component of that class (``unet`` or ``transformer``)."""
    import json

    import diffusers

    from .models import model_index
    from .models.loading import weight_kwargs

    folder = _network_dir(unet)
    name = json.loads((folder / "config.json").read_text()).get("_class_name", "")
    slots = [k for k, v in model_index(pipeline).items() if isinstance(v, list) and v[-1:] == [name]]
    if not slots or not hasattr(diffusers, name):
        raise ConfigError(f"--unet: {unet!r} holds a {name or 'network without a _class_name'}, which the base "
                          f"pipeline {pipeline!r} has no component of")
    network = getattr(diffusers, name).from_pretrained(folder, **dtype_kwarg(dtype), **weight_kwargs(allow_pickle))
    return {slots[0]: network}


def _lora_dir(lora: str) -> str:
    """A folder holding LoRA weights (or a weights file); ConfigError when it does not exist."""
    if not Path(lora).expanduser().exists():
        raise ConfigError(f"--lora: {lora!r}: no such folder or file (a finished run's folder holds "
                          "pytorch_lora_weights.safetensors)")
    return str(Path(lora).expanduser())


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 25, guidance: float = 7.5,
             resolution: int | None = None, batch_size: int = 16, progress: bool = False) -> list[Image.Image]:
    """One image per (prompt, seed) pair, in order; image i depends only on (prompts[i], seeds[i])."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    from .models import call_options

    pipe.set_progress_bar_config(disable=True)
    size = {"height": resolution, "width": resolution} if resolution else {}
    options = call_options(pipe)  # e.g. SD3 / Flux: the T5 context the family trains with
    images: list[Image.Image] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        chunk_p, chunk_s = list(prompts[i : i + batch_size]), seeds[i : i + batch_size]
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk_s]
        out = pipe(prompt=chunk_p, num_inference_steps=steps, guidance_scale=guidance, generator=generators, **size,
                   **options)  # prompt by name: FLUX.2's first positional argument is its reference image
        images.extend(out.images)
    return images


def generate_pair_grid(family, prompts: Sequence[str], *, seed: int, steps: int, guidance: float,
                       resolution: int) -> Image.Image:
    """Reference (top row, when the family has one) and policy (bottom row) images for the same prompts and seeds."""
    from .images import image_grid

    seeds = [seed + i for i in range(len(prompts))]
    rows = {}
    for name, reference in (("reference", True), ("policy", False)):
        if reference and not family.has_reference:
            continue
        with family.pipeline(reference=reference) as pipe:
            rows[name] = generate(pipe, prompts, seeds, steps=steps, guidance=guidance, resolution=resolution)
    return image_grid(rows, col_labels=list(prompts))
