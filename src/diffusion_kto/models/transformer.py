"""What the flow-matching transformer families (SD3 / SD3.5 in :mod:`.sd3`, FLUX.1 in :mod:`.flux`) share: loading
their parts through diffusers / transformers ``from_pretrained``, LoRA on the transformer's attention projections, the
reference (adapters off, or a frozen copy), the VAE's shifted and scaled latents, the rectified-flow forward process
with the configured sigma law and loss weighting (:mod:`diffusion_kto.flow`), checkpoint state and the export.

A subclass names its pipeline class and parts, builds its :class:`~.base.Conditioning` and calls its transformer."""
from __future__ import annotations

import contextlib
import copy
import importlib
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from .. import flow
from ..config import ConfigError, FlowConfig
from . import lora_formats, quantize
from .base import Noised, add_lora, frozen, place, unwrap
from .loading import weight_kwargs

DENOISER = ("unet", "transformer")  # the trainer asks for the denoising network by the name "unet"


def import_class(path: str) -> type:
    """``"diffusers.SD3Transformer2DModel"`` -> the class."""
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def load_parts(pretrained: str, parts: dict[str, str], wanted: set[str], *, revision: str | None,
               variant: str | None, allow_pickle: bool, quantized: dict | None = None) -> dict:
    """Each part ``name -> "package.Class"`` from the pipeline's ``name/`` subfolder; weights (models) only when in
    ``wanted`` (None otherwise), tokenizers and the scheduler always (they are a few bytes); safetensors only unless
    ``allow_pickle``; ``quantized``: extra keywords of the parts loaded quantized (``{"transformer": {...}}``)."""
    loaded = {}
    for name, path in parts.items():
        cls = import_class(path)
        is_model = isinstance(cls, type) and issubclass(cls, nn.Module)
        if is_model and name not in wanted:
            loaded[name] = None
            continue
        kw = {"variant": variant, **weight_kwargs(allow_pickle), **(quantized or {}).get(name, {})} if is_model else {}
        loaded[name] = cls.from_pretrained(pretrained, subfolder=name, revision=revision, **kw)
    return loaded


class FlowTransformerFamily:
    """The shared body of the SD3 and Flux families behind :class:`~.base.DiffusionFamily`."""

    pipeline_class: ClassVar[str]  # "diffusers.StableDiffusion3Pipeline"
    parts: ClassVar[dict[str, str]]  # component -> "package.Class", as in model_index.json
    text_parts: ClassVar[tuple[str, ...]]  # the text encoders (loaded for "text_encoder")
    # family-specific config keys this family honours (a subclass adds its own: FlowTransformerFamily.reads | {...})
    reads: ClassVar[frozenset[str]] = frozenset({"flow", "model.quantize_base"})
    kohya_layout: ClassVar[str] = ""  # kohya names of its LoRA that diffusers loads back ("bfl" for FLUX.1); "": none
    pipeline_kwargs: ClassVar[dict] = {}  # DiffusionPipeline.from_pretrained needs nothing extra (no safety checker)

    def __init__(self, *, pretrained: str, parts: dict, flow_settings: FlowConfig | None = None,
                 quantize_base: str = "none", resolution: int = 1024, lora_rank: int = 0, lora_alpha: float | None = None,
                 lora_dropout: float = 0.0, lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                 weight_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 gradient_checkpointing: bool = False, with_reference: bool = True):
        self.pretrained, self.device, self.weight_dtype = pretrained, torch.device(device), weight_dtype
        self.quantize_base = quantize_base  # the frozen transformer's weights stay quantized (LoRA only)
        self.flow, self.resolution, self.lora_rank = flow_settings or FlowConfig(), resolution, lora_rank
        self.scheduler, self.vae = parts["scheduler"], frozen(parts["vae"], self.device, weight_dtype)
        self.text = {name: parts[name] for name in self.parts if name.startswith("tokenizer")}
        self.text.update({name: frozen(parts[name], self.device, weight_dtype) for name in self.text_parts})
        self.transformer_config = parts["transformer_config"]  # the transformer's config, also when it is not loaded
        vae_config = parts["vae_config"]
        self.latent_scale = float(vae_config.get("scaling_factor") or 1.0)
        self.latent_shift = float(vae_config.get("shift_factor") or 0.0)
        self.vae_factor = self.latent_factor(vae_config)
        self.transformer, self.ref_transformer = parts["transformer"], None
        if self.transformer is None:  # encoders only (dkto cache)
            return
        if lora_rank > 0:
            self._add_lora(lora_rank, lora_alpha, lora_dropout, lora_target_modules)
        else:
            keep = with_reference
            self.ref_transformer = frozen(copy.deepcopy(self.transformer), self.device, weight_dtype) if keep else None
            place(self.transformer.requires_grad_(True), self.device, torch.float32)
        self.transformer.train()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    @classmethod
    def from_pretrained(cls, pretrained: str, *, revision: str | None = None, variant: str | None = None,
                        components: tuple[str, ...] = ("unet", "vae", "text_encoder"), allow_pickle: bool = False,
                        **kw):
        """Load from a hub id or a local diffusers folder; ``components``: ``unet`` (the transformer), ``vae`` and
        ``text_encoder`` (every text encoder this run uses)."""
        wanted = {"transformer"} if set(DENOISER) & set(components) else set()
        wanted |= {"vae"} & set(components)
        if "text_encoder" in components:
            wanted |= set(cls.text_parts_used(kw))
        parts = load_parts(pretrained, cls.parts, wanted, revision=revision, variant=variant, allow_pickle=allow_pickle,
                           quantized=cls.quantized_parts(kw))
        from diffusers import AutoencoderKL

        parts["vae_config"] = dict(AutoencoderKL.load_config(pretrained, subfolder="vae", revision=revision))
        network = import_class(cls.parts["transformer"])
        parts["transformer_config"] = dict(network.load_config(pretrained, subfolder="transformer", revision=revision))
        return cls(pretrained=pretrained, parts=parts, **kw)

    @classmethod
    def latent_factor(cls, vae_config: dict) -> int:
        """How many pixels one latent spans per side: 2^(levels - 1) of an AutoencoderKL."""
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    @classmethod
    def quantized_parts(cls, kw: dict) -> dict:
        """The transformer's ``from_pretrained`` keywords for model.quantize_base (none: no keywords): its diffusers
        quantization config, loaded in the compute dtype."""
        kind, dtype = kw.get("quantize_base", "none"), kw.get("weight_dtype", torch.float32)
        config = quantize.diffusers_config(kind, dtype)
        return {} if config is None else {"transformer": {"quantization_config": config, "torch_dtype": dtype}}

    @classmethod
    def text_parts_used(cls, options: dict) -> tuple[str, ...]:
        """The text encoders a run with these options (keywords, or a family's attributes) uses; SD3 without T5
        leaves it out."""
        return cls.text_parts

    @classmethod
    def options(cls, cfg) -> dict:
        """The family's own keywords from a run config (flow.*, data.resolution; subclasses add theirs)."""
        return {"flow_settings": cfg.flow, "resolution": cfg.data.resolution, "quantize_base": cfg.model.quantize_base}

    @classmethod
    def check(cls, cfg, pretrained: str, index: dict) -> None:
        """Refuse settings this model cannot train with (ConfigError naming the key), before any weight loads."""
        quantize.check(cfg.model.quantize_base)
        if cfg.lora.rank > 0 and not cfg.lora.target_modules:
            raise ConfigError("lora.target_modules: empty; name the transformer's attention projections "
                              "(e.g. to_q, to_k, to_v, to_out.0)")

    @classmethod
    def text_components(cls, options: dict) -> tuple[str, ...]:
        """The folders a text-embedding cache depends on: the text encoders used and every tokenizer."""
        return cls.text_parts_used(options) + tuple(n for n in cls.parts if n.startswith("tokenizer"))

    @classmethod
    def network_config(cls, pretrained: str, revision: str | None = None) -> dict:
        """The config of a located pipeline's transformer (its transformer/config.json), without its weights."""
        return dict(import_class(cls.parts["transformer"]).load_config(pretrained, subfolder="transformer",
                                                                       revision=revision))

    @classmethod
    def lora_source(cls, alpha: float, network_config: dict) -> lora_formats.LoraSource:
        """What writing this family's LoRA file needs besides the weights (:func:`.lora_formats.write_lora`)."""
        return lora_formats.LoraSource(alpha=float(alpha), pipeline_class=cls.pipeline_class.rsplit(".", 1)[-1],
                                       kohya_layout=cls.kohya_layout, unet_config=dict(network_config),
                                       component="transformer")

    @classmethod
    def sampler(cls, scheduler):
        """The scheduler to sample with: the pipeline's own flow-matching Euler sampler, as trained."""
        return scheduler

    # ------------------------------------------------------------------------------------------ setup

    def _add_lora(self, rank: int, alpha: float | None, dropout: float, targets: tuple[str, ...]) -> None:
        """Freeze the transformer in the compute dtype and add fp32 LoRA adapters on ``targets`` (B = 0: the policy
        starts as the reference)."""
        add_lora(self.transformer, self.device, self.weight_dtype, rank, alpha, dropout, targets,
                 cast=self.quantize_base == "none")  # a quantized base loaded in the compute dtype: moved, never cast

    @property
    def has_reference(self) -> bool:
        """Whether reference predictions are available (LoRA, or a full fine-tune loaded with its frozen copy)."""
        return self.lora_rank > 0 or self.ref_transformer is not None

    def trainable_module(self) -> nn.Module:
        """The transformer (possibly wrapped by the trainer)."""
        return self.transformer

    def wrap(self, prepare: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the transformer by ``prepare(transformer)``; the inner one stays reachable through :func:`unwrap`."""
        self.transformer = prepare(self.transformer)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA weights, or every transformer weight for a full fine-tune."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def require(self, name: str) -> nn.Module:
        """A loaded part, or a clear error when the run was set up without it (cached data, T5 dropped)."""
        module = self.text.get(name) if name in self.text else getattr(self, name)
        if module is None:
            raise RuntimeError(f"this model was loaded without its {name} (data.cache holds its outputs)")
        return module

    # ------------------------------------------------------------------------------------------ latents and noise

    @torch.no_grad()
    def latent_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of the VAE posterior q(z|image): (B, 3, H, W) -> 2 x (B, C, H/f, W/f)."""
        vae = self.require("vae")
        dist = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
        return dist.mean, dist.std

    def sample_latents(self, mean: Tensor, std: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """x0 = scaling_factor * (mean + std * eps - shift_factor), (B, C, h, w) (SD3 / Flux latent normalisation)."""
        mean, std = mean.to(self.device), std.to(self.device)
        z = mean + std * noise_fn(tuple(mean.shape)).to(mean)
        return ((z - self.latent_shift) * self.latent_scale).float()

    def encode_images(self, pixels: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """x0 of images in [-1, 1]: :meth:`latent_moments` then :meth:`sample_latents`."""
        return self.sample_latents(*self.latent_moments(pixels), noise_fn)

    def sigma_shift(self) -> float:
        """The shift s of sigma' = s sigma / (1 + (s - 1) sigma): flow.shift, else the model's own law."""
        return self.flow.shift if self.flow.shift is not None else self.default_shift()

    def default_shift(self) -> float:
        """The model's own shift (SD3: its scheduler's fixed shift; Flux overrides with the resolution-dependent one)."""
        return float(self.scheduler.config.get("shift", 1.0))

    def timesteps(self, seed: int, draw_ids: Tensor, stream: int) -> Tensor:
        """sigma per sample: the flow.timesteps law from its (seed, draw id, stream) generator, then shifted: (B,)."""
        f = self.flow
        sigma = flow.draw(f.timesteps, seed, draw_ids, stream, logit_mean=f.logit_mean, logit_std=f.logit_std,
                          mode_scale=f.mode_scale)
        return flow.shift(sigma, self.sigma_shift())

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Noised:
        """(x_sigma = (1 - sigma) x0 + sigma eps, v = eps - x0, the flow.weighting weights) for sigma = ``t``."""
        noise, sigma = noise.to(x0), t.to(x0.device)
        f = self.flow
        weight = flow.weighting(f.weighting, sigma, logit_mean=f.logit_mean, logit_std=f.logit_std,
                                mode_scale=f.mode_scale)
        return Noised(flow.noisy(x0, noise, sigma), flow.velocity(x0, noise), weight)

    def predict(self, x_t: Tensor, t: Tensor, cond, *, reference: bool = False) -> Tensor:
        """The transformer's velocity for (x_sigma, sigma, c), (B, C, h, w); the reference runs without grad."""
        if not reference:
            return self.forward(self.transformer, x_t, t, cond)
        with torch.no_grad(), self.reference_weights() as ref:
            return self.forward(ref, x_t.to(self.weight_dtype), t, cond.to(dtype=self.weight_dtype))

    def forward(self, transformer: nn.Module, x_t: Tensor, sigma: Tensor, cond) -> Tensor:
        """One call of ``transformer`` on latents (B, C, h, w) at noise levels sigma (B,): the family's own."""
        raise NotImplementedError

    @contextlib.contextmanager
    def reference_weights(self) -> Iterator[nn.Module]:
        """The reference transformer: the frozen copy, or the policy with its LoRA adapters disabled (restored)."""
        if self.ref_transformer is not None:
            yield self.ref_transformer
            return
        if self.lora_rank == 0:
            raise RuntimeError("this model was loaded without a reference (with_reference=False)")
        inner = unwrap(self.transformer)
        inner.disable_adapters()
        try:
            yield inner
        finally:
            inner.enable_adapters()

    # ------------------------------------------------------------------------------------------ state and export

    def trainable_state(self, model_state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """LoRA weights (peft naming) or the whole transformer's state dict, detached on CPU; from ``model_state`` (a
        gathered whole state dict, e.g. under FSDP) when given."""
        inner = unwrap(self.transformer)
        state = inner.state_dict() if model_state is None else model_state
        if self.lora_rank > 0:
            from peft.utils import get_peft_model_state_dict

            state = get_peft_model_state_dict(inner, state_dict=state)
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def model_state(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`trainable_state` output keyed like the transformer's own state dict (LoRA: peft names back)."""
        if self.lora_rank == 0:
            return weights
        from peft.utils import get_peft_model_state_dict

        names = [n for n, p in unwrap(self.transformer).named_parameters() if p.requires_grad]
        tagged = {n: torch.tensor(i) for i, n in enumerate(names)}  # peft renames keys; the tags say which is which
        tags = get_peft_model_state_dict(unwrap(self.transformer), state_dict=tagged)  # peft key -> tag
        return {names[int(tags[k])]: v for k, v in weights.items()}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`trainable_state` output."""
        inner = unwrap(self.transformer)
        if self.lora_rank == 0:
            inner.load_state_dict(state, strict=True)
            return
        from peft.utils import set_peft_model_state_dict

        unexpected = getattr(set_peft_model_state_dict(inner, state), "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"checkpoint has LoRA keys this model lacks: {unexpected[:5]}")

    def export(self, out_dir: str, model_state: dict[str, Tensor] | None = None) -> list[str]:
        """LoRA -> ``pytorch_lora_weights.safetensors`` (the pipeline's ``load_lora_weights``); full ->
        ``transformer/`` (``from_pretrained``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.lora_rank > 0:  # the adapter config in the header: the loader scales by lora_alpha / r as training did
            pipeline = import_class(self.pipeline_class)
            config = unwrap(self.transformer).peft_config["default"].to_dict()
            pipeline.save_lora_weights(out, transformer_lora_layers=self.trainable_state(model_state),
                                       transformer_lora_adapter_metadata=config, safe_serialization=True)
            return [str(out / "pytorch_lora_weights.safetensors")]
        transformer = unwrap(self.transformer) if model_state is None else self._plain(model_state)
        transformer.save_pretrained(out / "transformer", safe_serialization=True)
        return [str(out / "transformer")]

    def _plain(self, state: dict[str, Tensor]) -> nn.Module:
        """An unwrapped transformer of this architecture holding ``state`` (built on the meta device, no copy)."""
        inner = unwrap(self.transformer)
        with torch.device("meta"):
            plain = type(inner).from_config(inner.config)
        plain.load_state_dict(state, strict=True, assign=True)
        return plain

    @contextlib.contextmanager
    def pipeline(self, *, reference: bool = False) -> Iterator:
        """The family's diffusers pipeline over these modules (policy or reference weights), its own sampler."""
        for name in self.text_parts_used(vars(self)):
            self.require(name)
        modules = {"vae": self.require("vae"), "scheduler": self.scheduler, **self.text}
        with contextlib.ExitStack() as stack:
            transformer = stack.enter_context(self.reference_weights()) if reference else unwrap(self.transformer)
            yield import_class(self.pipeline_class)(transformer=transformer, **modules, **self.pipeline_options())

    def pipeline_options(self) -> dict:
        """Extra constructor keywords of the family's pipeline from the model folder's own flags (none here)."""
        return {}
