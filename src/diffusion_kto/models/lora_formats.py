"""LoRA files in the two key formats people load: diffusers' and kohya sd-scripts'.

The trained weights are peft's: ``<module path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), scaled by
alpha / r. Formats written:

- ``diffusers``: ``unet.<module path>.lora.down.weight`` / ``.lora.up.weight`` (diffusers' own ``save_lora_weights``),
  with the adapter config (rank, alpha, modules) in the safetensors header, so that ``pipe.load_lora_weights`` scales
  by alpha / r as training did.
- ``kohya``: ``lora_unet_<name>.lora_down.weight`` (= lora_A), ``.lora_up.weight`` (= lora_B) and ``.alpha`` (a
  0-dim float32 tensor; the loader scales by alpha / r), where ``<name>`` is the module's path in the UNet kohya
  sd-scripts builds, dots turned into underscores. For SD 1.x / 2.x that UNet uses diffusers' module paths
  (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``); for SDXL it is the original (LDM / "sgm")
  UNet (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``): :func:`sgm_module_name`. Text-encoder LoRA would be
  ``lora_te_`` (SD) or ``lora_te1_`` / ``lora_te2_`` (SDXL); this project trains the UNet only. ComfyUI's LoRA loader,
  A1111 / Forge and kohya's own scripts read these names (docs/models.md). FLUX.1 uses Black Forest Labs' module names
  with q, k, v fused (:mod:`.flux_kohya`); SD3 has no kohya format that diffusers loads back, so none is written.

Every file is written to a temporary name beside its target and renamed into place: no half-written output."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import flux_kohya

LORA_FILE = "pytorch_lora_weights.safetensors"
FORMATS = ("diffusers", "kohya")
KOHYA_PREFIX = "lora_unet_"
A, B = ".lora_A.weight", ".lora_B.weight"

# diffusers resnet sub-module -> its name in the original (LDM) ResBlock
RESNET_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# diffusers modules outside the blocks -> LDM names
TOP_SGM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


@dataclass(frozen=True)
class LoraSource:
    """What writing a LoRA file needs besides its weights: the scale, the family's pipeline and kohya naming."""

    alpha: float  # LoRA alpha (lora.alpha, or the rank): weights are scaled by alpha / r
    pipeline_class: str  # the diffusers pipeline whose save_lora_weights writes the diffusers format
    # "diffusers" (module paths), "sgm" (SDXL's LDM UNet), "bfl" / "bfl2" (FLUX.1's / FLUX.2's own names), "" (none)
    kohya_layout: str = "diffusers"
    unet_config: dict = field(default_factory=dict)  # the network's config (block layout for "sgm", widths for "bfl")
    component: str = "unet"  # the pipeline component the LoRA belongs to


def lora_modules(peft_state: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """peft LoRA weights grouped by module path: {path: (A (r, in, ...), B (out, r, ...))}; ValueError on a stray
    key."""
    paths = sorted({k[: -len(A)] for k in peft_state if k.endswith(A)})
    stray = set(peft_state) - {p + s for p in paths for s in (A, B)}
    missing = [p for p in paths if p + B not in peft_state]
    if stray or missing or not paths:
        raise ValueError(f"not a peft LoRA state dict: {sorted(stray)[:3] or missing[:3] or 'no lora_A weights'}")
    return {p: (peft_state[p + A], peft_state[p + B]) for p in paths}


def adapter_metadata(peft_state: dict[str, Tensor], alpha: float) -> dict:
    """The peft LoraConfig fields diffusers builds the adapter from when loading (r, lora_alpha, target modules)."""
    modules = lora_modules(peft_state)
    ranks = {a.shape[0] for a, _ in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA modules of several ranks {sorted(ranks)}: one rank per file is supported")
    return {"r": ranks.pop(), "lora_alpha": float(alpha), "target_modules": sorted(modules)}


def sgm_module_name(path: str, unet_config: dict) -> str:
    """A diffusers UNet2DConditionModel module path -> its path in the original LDM UNet ("sgm"), which kohya
    sd-scripts trains SDXL on: down_blocks.i.{resnets,attentions}.j -> input_blocks.(1 + i (L+1) + j).{0,1},
    downsamplers -> input_blocks.((i+1)(L+1)).0.op, mid_block -> middle_block.{0,1,2},
    up_blocks.i.{resnets,attentions}.j -> output_blocks.(i (L+1) + j).{0,1}, upsamplers -> .{1,2}.conv;
    L = layers_per_block, resnet parts renamed (conv1 -> in_layers.2, ...). ValueError for a module it has no name for."""
    if path in TOP_SGM:
        return TOP_SGM[path]
    per = unet_config.get("layers_per_block", 2)
    per = per[0] if isinstance(per, (list, tuple)) and len(set(per)) == 1 else per
    if not isinstance(per, int):
        raise ValueError(f"no kohya (LDM) name for UNets with layers_per_block={per!r}")
    parts = path.split(".")
    try:
        if parts[0] == "down_blocks":
            return _sgm_down(int(parts[1]), parts[2], int(parts[3]), parts[4:], per)
        if parts[0] == "mid_block":
            index = 1 if parts[1] == "attentions" else 2 * int(parts[2])  # resnet, attention, resnet
            return _join("middle_block", index, _inner(parts[1], parts[3:])[1:])
        if parts[0] == "up_blocks":
            attends = str(unet_config["up_block_types"][int(parts[1])]).startswith("CrossAttn")
            return _sgm_up(int(parts[1]), parts[2], int(parts[3]), parts[4:], per, attends)
    except (IndexError, ValueError, KeyError):
        pass
    raise ValueError(f"no kohya (LDM) name for the UNet module {path!r}")


def _sgm_down(i: int, kind: str, j: int, rest: list[str], per: int) -> str:
    """input_blocks name of a module of down block i."""
    if kind == "downsamplers":
        return _join("input_blocks", (i + 1) * (per + 1), 0, ["op", *rest[1:]])
    return _join("input_blocks", 1 + i * (per + 1) + j, _inner(kind, rest))


def _sgm_up(i: int, kind: str, j: int, rest: list[str], per: int, attends: bool) -> str:
    """output_blocks name of a module of up block i (up blocks hold L + 1 layers)."""
    if kind == "upsamplers":
        return _join("output_blocks", i * (per + 1) + per, 2 if attends else 1, rest)
    return _join("output_blocks", i * (per + 1) + j, _inner(kind, rest))


def _inner(kind: str, rest: list[str]) -> list:
    """[position in the LDM block, *sub-path]: resnets at 0 (parts renamed), attentions at 1 (names kept)."""
    if kind == "resnets":
        return [0, RESNET_SGM[rest[0]], *rest[1:]]
    if kind == "attentions":
        return [1, *rest]
    raise ValueError(kind)


def _join(*parts) -> str:
    """Dotted path of the parts, lists flattened."""
    flat = [str(q) for p in parts for q in (p if isinstance(p, list) else [p])]
    return ".".join(flat)


def kohya_name(path: str, source: LoraSource) -> str:
    """The kohya module name of a UNet module path: lora_unet_ + its (diffusers or LDM) path with _ for dots."""
    if source.kohya_layout == "sgm":
        path = sgm_module_name(path, source.unet_config)
    elif source.kohya_layout != "diffusers":
        raise ValueError(f"unknown kohya layout {source.kohya_layout!r}")
    return KOHYA_PREFIX + path.replace(".", "_")


def to_kohya(peft_state: dict[str, Tensor], source: LoraSource) -> dict[str, Tensor]:
    """peft LoRA weights -> kohya keys: <name>.lora_down.weight (A), .lora_up.weight (B), .alpha (0-dim float32)."""
    if source.kohya_layout in ("bfl", "bfl2"):
        layout = flux_kohya.FLUX1 if source.kohya_layout == "bfl" else flux_kohya.FLUX2
        return flux_kohya.to_bfl_kohya(peft_state, source.alpha, source.unet_config, layout)
    out: dict[str, Tensor] = {}
    for path, (down, up) in lora_modules(peft_state).items():
        name = kohya_name(path, source)
        if name + ".alpha" in out:
            raise ValueError(f"two UNet modules map to the kohya name {name!r}")
        out.update({name + ".lora_down.weight": down.contiguous(), name + ".lora_up.weight": up.contiguous(),
                    name + ".alpha": torch.tensor(float(source.alpha), dtype=torch.float32)})
    return out


def peft_from_diffusers(state: dict[str, Tensor], component: str = "unet") -> dict[str, Tensor]:
    """A diffusers-format LoRA file's ``component`` weights back in peft naming (inverse of the diffusers export, which
    renames attention projections' lora_A / lora_B to lora.down / lora.up and keeps peft's names elsewhere)."""
    prefix = component + "."
    mapping = {".lora.down.weight": A, ".lora.up.weight": B, A: A, B: B}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            raise ValueError(f"key {key!r} is not a {component} LoRA weight of a diffusers-format file")
        stem = next((key[: -len(s)] for s in mapping if key.endswith(s)), None)
        if stem is None:
            raise ValueError(f"key {key!r} is not a LoRA down or up weight")
        out[stem[len(prefix):] + mapping[key[len(stem):]]] = value
    return out


def diffusers_layers(peft_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The UNet weights of a diffusers-format file: diffusers' own conversion (attention projections' lora_A / lora_B
    -> lora.down / lora.up). When that leaves a mixture (other target modules keep peft's names), peft's names
    throughout: diffusers' loader converts a file by its first key's naming and would drop the other half."""
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = convert_state_dict_to_diffusers(peft_state)
    renamed = {k for k in layers if ".lora.down." in k or ".lora.up." in k}
    return dict(peft_state) if renamed and len(renamed) < len(layers) else layers


def write_lora(path: str | Path, peft_state: dict[str, Tensor], source: LoraSource, fmt: str) -> Path:
    """Write peft LoRA weights to ``path`` in ``fmt`` (diffusers or kohya), atomically (temporary file, rename)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".dkto-lora-", dir=path.parent) as tmp:
        written = Path(tmp) / LORA_FILE
        if fmt == "diffusers":
            _save_diffusers(tmp, peft_state, source)
        else:
            _save_kohya(written, peft_state, source)
        os.replace(written, path)
    return path


def _save_diffusers(folder: str, peft_state: dict[str, Tensor], source: LoraSource) -> None:
    """diffusers' own writer of the family's pipeline, with the adapter config in the header when it takes one."""
    import inspect

    import diffusers

    save = getattr(diffusers, source.pipeline_class).save_lora_weights
    # a UNet's attention LoRA takes diffusers' lora.down / lora.up names; a transformer's keeps peft's, as its
    # pipeline's own save_lora_weights writes them
    layers = diffusers_layers(peft_state) if source.component == "unet" else dict(peft_state)
    kwargs = {f"{source.component}_lora_layers": layers}
    metadata_kw = f"{source.component}_lora_adapter_metadata"
    if metadata_kw in inspect.signature(save).parameters:  # diffusers >= 0.35
        kwargs[metadata_kw] = adapter_metadata(peft_state, source.alpha)
    save(folder, weight_name=LORA_FILE, safe_serialization=True, **kwargs)


def _save_kohya(path: Path, peft_state: dict[str, Tensor], source: LoraSource) -> None:
    """The kohya-format file, with the ss_* header fields kohya's tools show (network module, dim, alpha)."""
    from safetensors.torch import save_file

    meta = adapter_metadata(peft_state, source.alpha)
    header = {"ss_network_module": "networks.lora", "ss_network_dim": str(meta["r"]),
              "ss_network_alpha": json.dumps(float(source.alpha)), "format": "pt"}
    save_file(to_kohya(peft_state, source), str(path), metadata=header)
