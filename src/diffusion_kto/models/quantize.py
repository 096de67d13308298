"""A quantized frozen base for LoRA (``model.quantize_base``): the transformer's frozen weights load quantized through
diffusers' own ``quantization_config`` and stay so; peft wraps its quantized linear layers, and the LoRA adapters and
their optimizer state stay in fp32 (the compute dtype follows the run's mixed precision).

| setting | library | where it runs | peft's LoRA layer |
|---|---|---|---|
| ``nf4`` | bitsandbytes (QLoRA's 4-bit NormalFloat, double quantization, bf16 compute) | CUDA | ``bnb.Linear4bit`` |
| ``int8`` | torchao int8 weight-only (per-channel scales) | CPU and CUDA | ``TorchaoLoraLinear`` |
| ``fp8`` | torchao float8 (e4m3) weight-only | CPU and CUDA | ``TorchaoLoraLinear`` |

optimum-quanto is not offered: peft has no LoRA layer for its quantized linears. Why these, in docs/models.md."""
from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..errors import ConfigError

KINDS = ("none", "nf4", "int8", "fp8")
PACKAGES = {"nf4": "bitsandbytes", "int8": "torchao", "fp8": "torchao"}


def check(kind: str) -> None:
    """Refuse, in one line naming model.quantize_base, a quantized base that cannot load here: nf4 without a CUDA GPU
    (bitsandbytes' 4-bit kernels are CUDA-only in diffusers; checked first, since no install fixes it), or a missing
    package. config.py refuses it with a full fine-tune."""
    if kind == "none":
        return
    key = f"model.quantize_base={kind}"
    package = PACKAGES[kind]
    if kind == "nf4" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: bitsandbytes' 4-bit weights need a CUDA GPU and none is visible; on a CPU use "
                          "model.quantize_base=int8 or fp8 (torchao)")
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{key}: needs the {package} package (pip install {package})")


def diffusers_config(kind: str, compute_dtype: torch.dtype):
    """The diffusers ``quantization_config`` for ``kind`` (None for ``none``); ``compute_dtype``: nf4's matmul dtype."""
    if kind == "none":
        return None
    import diffusers

    if kind == "nf4":  # QLoRA (Dettmers et al. 2023): NF4 blocks of 64, their scales quantized again (double quant)
        return diffusers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return diffusers.TorchAoConfig(Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig())


def quantized_linears(module: nn.Module) -> int:
    """How many layers of ``module`` hold a quantized weight (a bitsandbytes or torchao tensor subclass)."""
    plain = (torch.Tensor, nn.Parameter)
    return sum(type(getattr(m, "weight", None)) not in plain + (type(None),) for m in module.modules()
               if not list(m.children()))
