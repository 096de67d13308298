"""`dkto export RUN_DIR --format diffusers|kohya --out FILE`: a finished run's or a checkpoint's LoRA as one file.

RUN_DIR is a run folder (``pytorch_lora_weights.safetensors`` + ``config.yaml``, what ``dkto train`` exports) or a
checkpoint folder (``checkpoints/checkpoint-N``: ``weights.safetensors`` + ``manifest.json`` with the run's config).
The run's ``model.pretrained`` says which family the LoRA belongs to (its ``model_index.json``) and gives its network's
config (the block layout kohya's SDXL names need, FLUX.1's widths); ``lora.alpha`` (or the rank) its scale. The key formats are
:mod:`diffusion_kto.models.lora_formats`'. A full fine-tune has no LoRA to export, an existing FILE is never
overwritten, and the file appears whole or not at all."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..models import family_of, resolve_pretrained
from ..models.lora_formats import FORMATS, LORA_FILE, peft_from_diffusers, write_lora
from ..models.loading import locate
from ..train import checkpoint

# what the tools that read each format are (printed after an export; docs/models.md has the details)
READERS = {"diffusers": "diffusers: pipe.load_lora_weights(FILE)",
           "kohya": "ComfyUI (LoraLoader), A1111 / Forge, kohya sd-scripts, and diffusers' load_lora_weights"}


@dataclass(frozen=True)
class RunLora:
    """A run's (or checkpoint's) LoRA weights in peft naming and the run settings an export needs."""

    weights: dict
    pretrained: str
    revision: str | None
    alpha: float


def export_lora(run_dir: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the LoRA of ``run_dir`` (a run or a checkpoint folder) to ``out`` in ``fmt`` keys; returns ``out``."""
    out = Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not a LoRA format; choose one of {', '.join(FORMATS)}")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out: {str(out)!r} must end in .safetensors (the tools list LoRA files by that suffix)")
    if out.exists():
        raise FileExistsError(f"--out: {out} already exists; an export never overwrites a file, choose another --out")
    lora = read_run_lora(Path(run_dir))
    pretrained = locate(resolve_pretrained(lora.pretrained), "model.pretrained", revision=lora.revision)
    family = family_of(pretrained, lora.revision)
    source = family.lora_source(lora.alpha, family.network_config(pretrained, lora.revision))
    if fmt == "kohya" and not source.kohya_layout:
        raise ConfigError(f"--format kohya: a {source.pipeline_class} LoRA has no kohya naming that diffusers loads "
                          "back; export --format diffusers (StableDiffusion3Pipeline.load_lora_weights and ComfyUI "
                          "read it)")
    return write_lora(out, lora.weights, source, fmt)


def read_run_lora(run_dir: Path) -> RunLora:
    """The LoRA of a run folder or a checkpoint folder; ConfigError naming what is missing (or a full fine-tune)."""
    from safetensors.torch import load_file

    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR: {str(run_dir)!r} is not a folder (a dkto train output_dir or one of its "
                          "checkpoints/checkpoint-N folders)")
    if (run_dir / checkpoint.MANIFEST).is_file():
        if not checkpoint.is_complete(run_dir, verify=True):
            raise ConfigError(f"RUN_DIR: {run_dir} is an incomplete or corrupt checkpoint (its files do not match "
                              "manifest.json); export another checkpoint")
        config = json.loads((run_dir / checkpoint.MANIFEST).read_text()).get("config") or {}
        settings = _settings(config, run_dir / checkpoint.MANIFEST)
        return RunLora(load_file(str(run_dir / "weights.safetensors")), *settings)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"RUN_DIR: {run_dir} has neither config.yaml (a run folder) nor manifest.json (a checkpoint)")
    settings = _settings(yaml.safe_load((run_dir / "config.yaml").read_text()) or {}, run_dir / "config.yaml")
    if not (run_dir / LORA_FILE).is_file():
        latest = checkpoint.latest_checkpoint(run_dir / "checkpoints")
        hint = f"; export a checkpoint instead, e.g. {latest}" if latest else ""
        raise ConfigError(f"RUN_DIR: {run_dir} has no {LORA_FILE}: the run has not finished{hint}")
    state = load_file(str(run_dir / LORA_FILE))
    component = next(iter(state), "unet").split(".", 1)[0]  # unet (SD, SDXL) or transformer (SD3, Flux)
    return RunLora(peft_from_diffusers(state, component), *settings)


def _settings(config: dict, where: Path) -> tuple[str, str | None, float]:
    """(model.pretrained, model.revision, LoRA alpha) of a run's resolved config; ConfigError for a full fine-tune."""
    model, lora = config.get("model") or {}, config.get("lora") or {}
    if not model.get("pretrained"):
        raise ConfigError(f"{where}: no model.pretrained in the run's config")
    rank = int(lora.get("rank") or 0)
    if rank == 0:
        raise ConfigError(f"{where}: lora.rank is 0, a full fine-tune: there is no LoRA to export (the trained "
                          "network is the run's unet/ or transformer/ folder: from_pretrained, or dkto sample --unet)")
    alpha = lora.get("alpha")
    return str(model["pretrained"]), model.get("revision"), float(rank if alpha is None else alpha)
