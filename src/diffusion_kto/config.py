"""Run configuration: nested dataclasses are the single source of truth.

Load a YAML file, apply dotted ``key=value`` overrides, validate every field before any model loads, and dump
the resolved config next to the run. Unknown keys and bad values raise :class:`ConfigError` naming the key and
the allowed values.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .flow import LAWS, WEIGHTINGS
from .objectives import OBJECTIVES, REWARD_SHIFTS, objective_class

__all__ = ["Config", "ConfigError", "load_config", "save_config", "to_dict", "validate"]


def _choice(default: str, choices: tuple[str, ...], help: str = "") -> Any:
    """A string field restricted to ``choices`` (checked by :func:`validate`)."""
    return field(default=default, metadata={"choices": choices, "help": help})


def _positive(default: float | int, help: str = "", *, allow_zero: bool = False) -> Any:
    """A number that must be > 0 (or >= 0 with allow_zero)."""
    return field(default=default, metadata={"min": 0, "strict": not allow_zero, "help": help})


def _unit(default: float, help: str = "") -> Any:
    """A probability in [0, 1]."""
    return field(default=default, metadata={"min": 0, "max": 1, "help": help})


@dataclass
class ModelConfig:
    """Which pretrained pipeline to align."""

    pretrained: str = "toy"  # hub id, local diffusers folder, or "toy" for the shipped tiny shapes-world model
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weights on the hub
    # weights load from safetensors only; true also loads pickled .bin files (unpickling can run code: trust them)
    allow_pickle: bool = False
    # a separate VAE (folder or hub id of a diffusers AutoencoderKL) instead of the pipeline's own, e.g. an fp16-safe
    # SDXL VAE; None = the pipeline's vae/
    vae: str | None = None
    drop_t5: bool = False  # SD3 / SD3.5: leave T5 unloaded, zeros in its place (as the pipeline without text_encoder_3)
    # FLUX.1 [dev]: the guidance embedding's value in training; null = 3.5 (FluxPipeline's default). Not for [schnell]
    guidance_scale: float | None = None
    # LoRA on a transformer family: keep the frozen transformer quantized (nf4: bitsandbytes, CUDA; int8 / fp8:
    # torchao, CPU or CUDA); the adapters and their optimizer stay in fp32 (models/quantize.py, docs/models.md)
    quantize_base: str = _choice("none", ("none", "nf4", "int8", "fp8"), "quantized frozen base for LoRA")


@dataclass
class LoRAConfig:
    """LoRA adapters on the UNet attention projections; rank 0 means a full UNet fine-tune."""

    rank: int = _positive(0, "0 = full fine-tune", allow_zero=True)
    alpha: float | None = None  # defaults to rank
    dropout: float = _unit(0.0)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class DataConfig:
    """Feedback rows (image, prompt, like/dislike) and how they are sampled and transformed."""

    path: str | None = None
    cache: str | None = None  # a `dkto cache` folder: cached VAE latents (and text embeddings) replace encoding
    image_column: str = "image"
    prompt_column: str = "prompt"
    label_column: str = "label"
    desirable_ratio: float = _unit(0.8, "gamma: probability of drawing a liked image (paper §4.2: 0.8)")
    caption_dropout: float = _unit(0.2, "probability of an empty prompt (official code default 0.2)")
    resolution: int = _positive(512)
    center_crop: bool = True
    random_flip: bool = True
    num_workers: int = _positive(0, allow_zero=True)
    streaming: bool = False  # read data.path as shards (folder, glob or train-{000..009}.tar) instead of loading it
    stream_buffer: int = _positive(1000, "data.streaming: rows per class buffer of each reader (docs/data.md)")
    max_pairs_per_prompt: int = _positive(4, "loss.name=dpo: same-prompt liked x disliked pairs kept per prompt")
    on_bad_row: str = _choice(
        "error", ("error", "skip"),
        "a row with a missing / unreadable image, unknown label, empty prompt, ...: error = stop, naming them all; "
        "skip = leave them out, counted in the log and listed in <output_dir>/skipped_rows.jsonl",
    )


@dataclass
class LossConfig:
    """The objective: Diffusion-KTO or a baseline."""

    # sft/csft/dpo are the paper's baselines; kto_paired, bco, nft go beyond the paper (docs/method.md)
    name: str = _choice("kto", tuple(OBJECTIVES))
    beta: float = _positive(5000.0, "paper: 5000; official script default 1000")
    utility: str = _choice("kt", ("kt", "loss_averse", "risk_seeking"))
    # per_prompt: Q_ref of each sample from the batch's samples of its own prompt (a prompt alone in the batch takes
    # the batch-wide one); see docs/method.md and benchmarks/results/online.md
    # centred: the batch's own mean of g like matched, but with its gradient and no clamp at 0, so that no common
    # shift of the implicit rewards changes the loss (degrading every image at once cannot satisfy the disliked term)
    reference_point: str = _choice("mismatched", ("mismatched", "matched", "per_prompt", "centred", "none"))
    # the amortized reference point (mismatched only; docs/method.md): fewer extra no-grad passes per step
    reference_fraction: float = _unit(1.0, "mismatched: estimate Q_ref on the first ceil(f*B) samples of the batch")
    reference_every: int = _positive(1, "mismatched: estimate Q_ref every k micro-steps, reuse it in between")
    reference_decay: float = _unit(0.0, "running mean of the Q_ref estimates: m = d m + (1-d) q, bias-corrected; 0 = newest")
    desirable_weight: float = _positive(1.0, allow_zero=True)
    undesirable_weight: float = _positive(1.0, allow_zero=True)
    # csft: where the "good image" / "bad image" phrase goes; the paper prefixes it. A suffix leaves a causal text
    # encoder's states of the prompt's own tokens as they were (the toy model's needs that: docs/method.md)
    csft_position: str = _choice("prefix", ("prefix", "suffix"))
    # kto_paired: lambda of the same-prompt pair term -log sigma(s beta (g_i - g_j)); 0 leaves the kto losses
    pair_weight: float = _positive(1.0, "kto_paired: weight of the same-prompt pair term", allow_zero=True)
    # kto_paired: the share of each global batch drawn as same-prompt (liked, disliked) pairs, the two images of a
    # pair on one noise and t (the diagnosis' lever, benchmarks/results/why-dpo-wins.md); the rest are gamma-draws
    pair_share: float = _unit(0.5, "kto_paired: share of each batch drawn as same-prompt pairs on shared draws")
    # bco: the reward shift delta, folded over the whole run: the midpoint of the liked and disliked mean rewards
    # (balanced) or the mean of every reward (pooled, TRL's BCOTrainer); they differ when data.desirable_ratio != 0.5
    reward_shift: str = _choice("balanced", REWARD_SHIFTS, "bco: running reward shift delta")
    # nft: beta' of the implicit policies v+- = v_ref +- beta' (v_theta - v_ref); loss.beta is not read by nft
    nft_beta: float = _positive(1.0, "nft: mixing coefficient of the implicit positive / negative policies")


@dataclass
class FlowConfig:
    """Flow-matching families (SD3 / SD3.5, FLUX.1): the sigma law and the loss weighting (docs/method.md)."""

    timesteps: str = _choice("logit_normal", LAWS, "sigma law before the shift: SD3 and Flux were trained logit-normal")
    logit_mean: float = 0.0  # m of logit_normal (and of the logit_normal weighting)
    logit_std: float = _positive(1.0, "s of logit_normal (and of the logit_normal weighting)")
    mode_scale: float = 1.29  # s of mode sampling / weighting, in [-1, 2 / (pi - 2)] (SD3 §3.1)
    shift: float | None = None  # sigma' = s sigma / (1 + (s-1) sigma); null = the model's (SD3: scheduler; Flux: by size)
    weighting: str = _choice("none", WEIGHTINGS, "per-sample weight of the errors: the density of that law at sigma")


@dataclass
class OptimConfig:
    """AdamW (or bitsandbytes 8-bit AdamW) with a warm-up schedule."""

    lr: float = _positive(1e-7)
    use_8bit_adam: bool = False
    adam_beta1: float = _unit(0.9)
    adam_beta2: float = _unit(0.999)
    adam_epsilon: float = _positive(1e-8)
    weight_decay: float = _positive(1e-2, allow_zero=True)
    max_grad_norm: float = _positive(1.0, "0 disables clipping", allow_zero=True)
    lr_scheduler: str = _choice(
        "constant_with_warmup", ("constant", "constant_with_warmup", "linear", "cosine")
    )
    warmup_steps: int = _positive(1000, allow_zero=True)


@dataclass
class TrainConfig:
    """How this run executes."""

    max_steps: int = _positive(10000)
    batch_size: int = _positive(2, "per process")
    grad_accum: int = _positive(1)
    mixed_precision: str = _choice("no", ("no", "fp16", "bf16"))
    gradient_checkpointing: bool = False
    seed: int = 0
    output_dir: str = "runs/dkto"
    overwrite: bool = False  # an existing output dir is never reused unless resuming or overwrite=true
    checkpoint_every: int = _positive(1000, "0 = only at the end", allow_zero=True)
    keep_checkpoints: int = _positive(3)
    resume: str | None = None  # "latest" or a checkpoint folder


@dataclass
class LogConfig:
    """Metrics and validation images."""

    every: int = _positive(10)
    report_to: str = _choice("none", ("none", "tensorboard", "wandb"))
    validation_every: int = _positive(0, "0 = no validation images", allow_zero=True)
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = _positive(25, "sampler steps")
    validation_guidance: float = _positive(7.5, allow_zero=True)


@dataclass
class Config:
    """A whole Diffusion-KTO run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


# ---------------------------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    """A readable name for a field type."""
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int -> float allowed), raising ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads no / off / yes / on as booleans
            return "yes" if value else "no"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a nested dict, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key {prefix}{key!s}; known keys here: {', '.join(known)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def validate(cfg: Any, prefix: str = "") -> None:
    """Check choices and ranges declared in field metadata, recursively, plus cross-field rules."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(meta['choices'])}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        if "min" in meta and value is not None:
            if value < meta["min"] or (meta.get("strict") and value == meta["min"]):
                op = ">" if meta.get("strict") else ">="
                raise ConfigError(f"{key}: must be {op} {meta['min']}, got {value!r}")
        if "max" in meta and value is not None and value > meta["max"]:
            raise ConfigError(f"{key}: must be <= {meta['max']}, got {value!r}")
    if not prefix:
        _validate_cross_fields(cfg)


def _validate_cross_fields(cfg: Config) -> None:
    """Rules that involve more than one field."""
    if cfg.train.resume not in (None, "latest") and not _exists(cfg.train.resume):
        raise ConfigError(f"train.resume: {cfg.train.resume!r} is neither 'latest' nor an existing checkpoint folder")
    if cfg.model.vae is not None and not cfg.model.vae.strip():
        raise ConfigError("model.vae: empty; give a folder or hub id of a diffusers AutoencoderKL, or leave it unset")
    if cfg.data.streaming and cfg.data.cache:
        raise ConfigError("data.cache: a cache is keyed by the rows of a feedback dataset loaded up front, which "
                          "data.streaming=true never loads; drop one of the two")
    if cfg.model.quantize_base != "none" and cfg.lora.rank == 0:
        raise ConfigError(f"model.quantize_base={cfg.model.quantize_base}: a quantized frozen base is for LoRA "
                          "(lora.rank > 0); a full fine-tune trains every base weight in full precision, so set "
                          "lora.rank or model.quantize_base=none")
    _validate_amortized_reference(cfg)
    _validate_flow(cfg)
    objective_class(cfg.loss.name).check(cfg)  # the objective's own rules (e.g. mismatched pairs need a batch)


def _validate_amortized_reference(cfg: Config) -> None:
    """The amortized reference point only applies to (and must leave at least two samples for) mismatched."""
    lc = cfg.loss
    amortized = lc.reference_fraction < 1 or lc.reference_every > 1 or lc.reference_decay > 0
    if amortized and lc.reference_point != "mismatched":
        raise ConfigError(
            f"loss.reference_fraction / reference_every / reference_decay amortize the mismatched reference point "
            f"only; loss.reference_point={lc.reference_point} computes Q_ref at no extra cost: leave them at 1 / 1 / 0"
        )
    if lc.reference_fraction <= 0:
        raise ConfigError(f"loss.reference_fraction: must be > 0, got {lc.reference_fraction}")
    if lc.reference_decay >= 1:
        raise ConfigError(f"loss.reference_decay: must be < 1 (1 would never update), got {lc.reference_decay}")


def _validate_flow(cfg: Config) -> None:
    """The mode law is a monotone map only for s in [-1, 2/(pi-2)]; a shift must be positive; a guidance finite > 0."""
    f = cfg.flow
    if not -1.0 <= f.mode_scale <= 2 / (math.pi - 2):
        raise ConfigError(f"flow.mode_scale: must be in [-1, {2 / (math.pi - 2):.3f}] (beyond it the mode law is not "
                          f"monotone), got {f.mode_scale}")
    if f.shift is not None and not (math.isfinite(f.shift) and f.shift > 0):
        raise ConfigError(f"flow.shift: must be > 0 (1 = no shift) or null for the model's own, got {f.shift}")
    g = cfg.model.guidance_scale
    if g is not None and not (math.isfinite(g) and g >= 0):
        raise ConfigError(f"model.guidance_scale: must be a number >= 0, or null for 3.5, got {g}")


def _exists(path: str) -> bool:
    """Path existence that treats unusable path strings (NUL bytes, too long) as missing."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain nested dict."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], parsed value); values are parsed as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. loss.beta=2000)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from None
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set a nested key, creating intermediate mappings."""
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (optional), apply dotted overrides, build and validate the :class:`Config`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(data, keys, value)
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
