"""FLUX.1 and FLUX.2 LoRA weights in kohya sd-scripts' naming (Black Forest Labs' module names), which ComfyUI, Forge
and diffusers' ``FluxPipeline`` / ``Flux2Pipeline.load_lora_weights`` read.

diffusers splits what BFL's transformer fuses: a double block's image q, k, v (``attn.to_q/to_k/to_v``) are one
``img_attn.qkv`` linear there, the text ones (``attn.add_q_proj/...``) one ``txt_attn.qkv``, and a single block's
q, k, v and MLP input (``attn.to_q/to_k/to_v``, ``proj_mlp``) one ``linear1``. A LoRA per split module (A_i: r x in,
B_i: out_i x r, scale alpha / r) is the LoRA of the fused module with

    lora_down = [A_1; A_2; ...]  (n r x in),    lora_up = blockdiag(B_1, B_2, ...)  (sum out_i x n r),    alpha' = n alpha

(its scale alpha' / (n r) = alpha / r, and B A = sum_i B_i A_i on each output block); a member without a LoRA gets
zero blocks. Loaders split a block-diagonal lora_up back into the members exactly (diffusers:
``_convert_kohya_flux_lora_to_diffusers``, which assumes FLUX.1's 19 double and 38 single blocks of width 3072).

FLUX.2's diffusers transformer already fuses a single block's linear1 (``attn.to_qkv_mlp_proj``), so only a double
block's q, k, v are split there; its loader (``_convert_kohya_flux2_lora_to_diffusers``) reads the names of
:data:`FLUX2` and counts the blocks from the keys."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PREFIX = "lora_unet_"
A, B = ".lora_A.weight", ".lora_B.weight"
DOUBLE = {  # diffusers path inside transformer_blocks.i -> (BFL name inside double_blocks_i, position in the fusion)
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_out.0": ("img_attn_proj", None),
    "attn.to_add_out": ("txt_attn_proj", None), "ff.net.0.proj": ("img_mlp_0", None), "ff.net.2": ("img_mlp_2", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None), "ff_context.net.2": ("txt_mlp_2", None),
    "norm1.linear": ("img_mod_lin", None), "norm1_context.linear": ("txt_mod_lin", None),
}
SINGLE = {  # inside single_transformer_blocks.i -> inside single_blocks_i
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation_lin", None),
}
TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
       "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
       "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
       "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
       "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
       "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
       "time_text_embed.text_embedder.linear_2": "vector_in_out_layer"}

# FLUX.2: diffusers Flux2Transformer2DModel paths -> BFL names, as diffusers' Flux2 kohya loader maps them back
DOUBLE2 = {"attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
           "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
           "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_out.0": ("img_attn_proj", None),
           "attn.to_add_out": ("txt_attn_proj", None), "ff.linear_in": ("img_mlp_0", None),
           "ff.linear_out": ("img_mlp_2", None), "ff_context.linear_in": ("txt_mlp_0", None),
           "ff_context.linear_out": ("txt_mlp_2", None)}
SINGLE2 = {"attn.to_qkv_mlp_proj": ("linear1", None), "attn.to_out": ("linear2", None)}
TOP2 = {"x_embedder": "img_in", "context_embedder": "txt_in",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in_in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in_out_layer", "proj_out": "final_layer_linear"}


@dataclass(frozen=True)
class Layout:
    """One generation's BFL names: double-block, single-block and top-level tables, and whether linear1 is split
    in diffusers (FLUX.1: q, k, v and the MLP input; FLUX.2: already one linear)."""

    double: dict
    single: dict
    top: dict
    split_linear1: bool


FLUX1 = Layout(DOUBLE, SINGLE, TOP, split_linear1=True)
FLUX2 = Layout(DOUBLE2, SINGLE2, TOP2, split_linear1=False)


def bfl_name(path: str, layout: Layout = FLUX1) -> tuple[str, int | None]:
    """A diffusers Flux transformer module path -> (kohya name, position in its fused linear or None); ValueError
    for a module kohya's Flux format has no name for (e.g. FLUX.1's final layer)."""
    for head, table, block in (("transformer_blocks.", layout.double, "double_blocks"),
                               ("single_transformer_blocks.", layout.single, "single_blocks")):
        if path.startswith(head):
            index, _, inner = path[len(head):].partition(".")
            if index.isdigit() and inner in table:
                name, position = table[inner]
                return f"{PREFIX}{block}_{index}_{name}", position
    if path in layout.top:
        return PREFIX + layout.top[path], None
    raise ValueError(f"no kohya (BFL) name for the Flux module {path!r}")


def member_widths(name: str, config: dict, layout: Layout = FLUX1) -> list[int]:
    """Output widths of a fused linear's members: q, k, v (and FLUX.1's MLP input, 4x wider) of the transformer
    width."""
    width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    return [width] * 3 + ([4 * width] if layout.split_linear1 and name.endswith("linear1") else [])


def to_bfl_kohya(peft_state: dict[str, Tensor], alpha: float, config: dict,
                 layout: Layout = FLUX1) -> dict[str, Tensor]:
    """peft LoRA weights of a Flux transformer (``<path>.lora_A.weight`` / ``.lora_B.weight``) -> kohya keys
    ``<name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``, fused linears block-diagonal (module docstring)."""
    paths = sorted({k[: -len(A)] for k in peft_state if k.endswith(A)})
    if not paths or set(peft_state) != {p + s for p in paths for s in (A, B)}:
        raise ValueError("not a peft LoRA state dict (every module needs lora_A and lora_B weights)")
    out: dict[str, Tensor] = {}
    groups: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}
    for path in paths:
        name, position = bfl_name(path, layout)
        down, up = peft_state[path + A], peft_state[path + B]
        if position is None:
            out.update(_entry(name, down, up, alpha))
        else:
            groups.setdefault(name, {})[position] = (down, up)
    for name, members in groups.items():
        out.update(_fused(name, members, member_widths(name, config, layout), alpha))
    return out


def _entry(name: str, down: Tensor, up: Tensor, alpha: float) -> dict[str, Tensor]:
    """The three kohya keys of one module."""
    return {name + ".lora_down.weight": down.contiguous(), name + ".lora_up.weight": up.contiguous(),
            name + ".alpha": torch.tensor(float(alpha), dtype=torch.float32)}


def _fused(name: str, members: dict[int, tuple[Tensor, Tensor]], widths: list[int], alpha: float) -> dict[str, Tensor]:
    """One fused linear from its members' LoRAs: stacked downs (n r x in), block-diagonal up (sum out_i x n r),
    alpha n alpha; absent members are zero blocks."""
    n, (down0, _) = len(widths), next(iter(members.values()))
    r = down0.shape[0]
    down = torch.zeros(n * r, down0.shape[1], dtype=down0.dtype)
    up = torch.zeros(sum(widths), n * r, dtype=down0.dtype)
    row = 0
    for position, width in enumerate(widths):
        if position in members:
            a, b = members[position]
            down[position * r:(position + 1) * r] = a
            up[row:row + width, position * r:(position + 1) * r] = b
        row += width
    return _entry(name, down, up, n * alpha)
