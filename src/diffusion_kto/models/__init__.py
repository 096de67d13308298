"""Model families. Each family is one file behind :mod:`diffusion_kto.models.base`; :data:`FAMILIES` maps a diffusers
pipeline class (``model_index.json``'s ``_class_name``) to its family, the only place that names them."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .. import registry
from ..config import ConfigError
from .base import DiffusionFamily, unwrap
from .chroma import Chroma
from .flux import Flux
from .flux2 import Flux2, Flux2Klein
from .loading import is_hub_id, loading_error, locate
from .qwen_image import QwenImage
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL
from .stable_diffusion import StableDiffusion
from .z_image import ZImage

__all__ = ["Chroma", "DiffusionFamily", "FAMILIES", "Flux", "Flux2", "Flux2Klein", "QwenImage", "StableDiffusion",
           "StableDiffusion3", "StableDiffusionXL", "ZImage", "call_options", "component_fingerprint", "family_of", "load_family", "resolve_pretrained",
           "sampling_scheduler", "text_components", "unwrap", "vae_fingerprint"]

# pipeline class -> family
FAMILIES: dict[str, type] = {"StableDiffusionPipeline": StableDiffusion, "StableDiffusionXLPipeline": StableDiffusionXL,
                             "StableDiffusion3Pipeline": StableDiffusion3, "FluxPipeline": Flux,
                             "ChromaPipeline": Chroma, "ZImagePipeline": ZImage,
                             "QwenImagePipeline": QwenImage, "Flux2Pipeline": Flux2,
                             "Flux2KleinPipeline": Flux2Klein}
# config keys (or sections) that only some families read; a family lists those it reads in its ``reads``
FAMILY_KEYS = ("flow", "model.drop_t5", "model.guidance_scale", "model.quantize_base", "model.vae")


def resolve_pretrained(name: str) -> str:
    """A model alias registered in the ``diffusion_kto.models`` entry points (``toy``: the shipped tiny shapes-world
    pipeline) as its folder; other names (hub ids, folders) pass through. ConfigError when the alias's provider
    cannot be loaded."""
    folder = registry.load(registry.MODELS, name, error=ConfigError)
    return name if folder is None else str(folder())


def model_index(pretrained: str, revision: str | None = None) -> dict:
    """The ``model_index.json`` of a located pipeline folder or hub id (from the local hub cache for an id)."""
    if not is_hub_id(pretrained):
        return json.loads((Path(pretrained).expanduser() / "model_index.json").read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(pretrained, "model_index.json", revision=revision)).read_text())


def family_of(pretrained: str, revision: str | None = None, key: str = "model.pretrained") -> type:
    """The family class of a located pipeline, from its ``model_index.json``; ConfigError naming an unsupported
    pipeline class and listing the supported ones."""
    cls = model_index(pretrained, revision).get("_class_name", "")
    if cls not in FAMILIES:
        raise ConfigError(f"{key}: {pretrained!r} is a {cls or 'pipeline without a _class_name'}, which is not "
                          f"supported; supported pipeline classes: {', '.join(FAMILIES)}")
    return FAMILIES[cls]


def component_fingerprint(pretrained: str, revision: str | None, component: str) -> str:
    """sha256 over the names and bytes of every file in a pipeline's ``component`` folder (e.g. ``vae``).

    What a cache of that component's outputs is keyed by: new weights, config or variant files change it. Hub ids
    are resolved to their local snapshot (downloading the folder when it is not there and the hub is reachable)."""
    root = Path(resolve_pretrained(pretrained))
    if not (root / component).is_dir():
        from huggingface_hub import snapshot_download

        located = locate(str(root), "model.pretrained", revision=revision)
        try:
            root = Path(snapshot_download(located, revision=revision, allow_patterns=[f"{component}/*"]))
        except Exception as err:
            raise ConfigError(f"model.pretrained: the {component} folder of {pretrained!r} cannot be had "
                              f"({type(err).__name__}); check the network and HF_HUB_OFFLINE") from None
    return _folder_fingerprint(root / component, f"is {pretrained!r} a diffusers pipeline?")


def vae_fingerprint(model) -> str:
    """The fingerprint of the VAE a :class:`~diffusion_kto.config.ModelConfig` uses: model.vae's files (a folder, or a
    hub id's local snapshot), else the pipeline's ``vae`` folder."""
    if model.vae is None:
        return component_fingerprint(model.pretrained, model.revision, "vae")
    located = locate(model.vae, "model.vae", marker="config.json")
    if is_hub_id(located):
        from huggingface_hub import snapshot_download

        try:
            # the files AutoencoderKL.from_pretrained reads, from the local cache or fetched when the hub is reachable
            located = snapshot_download(located, allow_patterns=["config.json", "diffusion_pytorch_model*.safetensors"])
        except Exception as err:
            raise ConfigError(f"model.vae: the files of {model.vae!r} cannot be had ({type(err).__name__}); check "
                              "the network and HF_HUB_OFFLINE") from None
    return _folder_fingerprint(Path(located), "is model.vae a diffusers AutoencoderKL folder?")


def _folder_fingerprint(folder: Path, hint: str) -> str:
    """sha256 over the relative names and bytes of every file under ``folder``."""
    import hashlib

    files = sorted(f for f in folder.rglob("*") if f.is_file())
    if not files:
        raise FileNotFoundError(f"{folder}: no files to fingerprint ({hint})")
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(folder)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _set_keys(cfg, key: str) -> list[str]:
    """The dotted keys under ``key`` (a key or a section) whose value differs from the default."""
    from ..config import Config

    section, _, name = key.partition(".")
    ours, default = getattr(cfg, section), getattr(Config(), section)
    names = [name] if name else [f.name for f in dataclasses.fields(ours)]
    return [f"{section}.{n}" for n in names if getattr(ours, n) != getattr(default, n)]


def refuse_unread(cfg, family: type, pretrained: str) -> None:
    """ConfigError naming a family-specific key that is set but that this model's family does not read (a flow.*
    key on SD 1.x, model.drop_t5 on Flux, model.guidance_scale on SD3, ...)."""
    for key in FAMILY_KEYS:
        if key in family.reads:
            continue
        for name in _set_keys(cfg, key):
            users = [cls for cls, fam in FAMILIES.items() if key in fam.reads]
            raise ConfigError(f"{name}: applies to {', '.join(users)} models only; {cfg.model.pretrained!r} is a "
                              f"{model_index(pretrained, cfg.model.revision).get('_class_name')} (leave {name} unset)")


def text_components(cfg) -> tuple[str, ...]:
    """The pipeline folders a text-embedding cache of this run depends on (text encoders used and tokenizers)."""
    m = cfg.model
    pretrained = locate(resolve_pretrained(m.pretrained), "model.pretrained", revision=m.revision)
    family = family_of(pretrained, m.revision)
    return family.text_components(family.options(cfg))


def _pipe_family(pipe) -> type:
    """The family of a loaded pipeline; a pipeline of another class samples as SD 1.x / 2.x does."""
    return FAMILIES.get(type(pipe).__name__, StableDiffusion)


def sampling_scheduler(pipe):
    """The scheduler a loaded pipeline samples with here: its family's choice (DDIM from the pipeline's scheduler
    config for the UNet families, the pipeline's own flow-matching Euler sampler for SD3 / Flux)."""
    return _pipe_family(pipe).sampler(pipe.scheduler)


def call_options(pipe) -> dict:
    """Extra keywords of ``pipe(...)`` that make it sample as its family trains (SD3 / Flux: the T5 context)."""
    return _pipe_family(pipe).call_options(pipe)


def load_family(cfg, *, weight_dtype: torch.dtype, device: torch.device | str, with_reference: bool = True,
                components: tuple[str, ...] = ("unet", "vae", "text_encoder")) -> DiffusionFamily:
    """Build the model family described by a :class:`~diffusion_kto.config.Config` (only ``components`` loaded);
    a missing or unreachable model, or one without safetensors weights, is one ConfigError naming model.pretrained."""
    m = cfg.model
    pretrained = locate(resolve_pretrained(m.pretrained), "model.pretrained", revision=m.revision)
    family = family_of(pretrained, m.revision)
    family.check(cfg, pretrained, model_index(pretrained, m.revision))  # its own rules first: they say why
    refuse_unread(cfg, family, pretrained)
    options = family.options(cfg)
    vae = {} if m.vae is None else {"vae": locate(m.vae, "model.vae", marker="config.json")}  # a separate VAE
    try:
        return family.from_pretrained(
            pretrained, revision=m.revision, variant=m.variant, allow_pickle=m.allow_pickle, components=components,
            **vae,
            lora_rank=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            lora_target_modules=tuple(cfg.lora.target_modules), weight_dtype=weight_dtype, device=device,
            gradient_checkpointing=cfg.train.gradient_checkpointing, with_reference=with_reference, **options,
        )
    except Exception as err:
        friendly = loading_error(err, "model.pretrained", m.pretrained, m.allow_pickle)
        if friendly is None:
            raise
        raise friendly from None
