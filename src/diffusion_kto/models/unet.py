"""What every UNet family (SD 1.x / 2.x, SDXL) shares: the UNet as the policy, LoRA adapters, the reference (the
same UNet with its adapters off, or a frozen copy in the compute dtype -- never a per-step weight swap), the VAE
latents, the DDPM forward process, trainable state and the diffusers export.

A family subclasses :class:`UNetFamily` and adds its text encoders, its :class:`~.base.Conditioning`, the UNet's
conditioning keywords (:meth:`UNetFamily.unet_inputs`) and its sampling pipeline."""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .. import diffusion
from . import lora_formats
from .base import Conditioning, Noised, add_lora, frozen, place, unwrap

COMPONENTS = ("unet", "vae", "text_encoder")  # roles: "text_encoder" stands for every text encoder of a family
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def load_vae(pretrained: str, revision: str | None, variant: str | None, vae: str | None, allow_pickle: bool,
             load: bool) -> tuple[nn.Module | None, dict]:
    """(the VAE or None when not ``load``, its config): the pipeline's ``vae/`` folder, or ``vae`` (model.vae: a folder
    or hub id of an AutoencoderKL) instead. The config (latent scaling) is always read, it is a few bytes."""
    from diffusers import AutoencoderKL

    from .loading import weight_kwargs

    where = {"pretrained_model_name_or_path": pretrained, "subfolder": "vae", "revision": revision}
    if vae is not None:
        where = {"pretrained_model_name_or_path": vae}
    config = dict(AutoencoderKL.load_config(**where))
    if not load:
        return None, config
    # a separate VAE is one model: the pipeline's variant (e.g. fp16 files) need not exist for it
    weights = AutoencoderKL.from_pretrained(**where, **({} if vae else {"variant": variant}), **weight_kwargs(allow_pickle))
    return weights, config


class UNetFamily:
    """The shared half of a UNet family behind :class:`~diffusion_kto.models.base.DiffusionFamily`.

    Subclasses set :attr:`conditioning`, :attr:`pipeline_class` (the diffusers pipeline that loads the LoRA and
    samples), :attr:`text_folders` (the folders a text cache is keyed by) and :attr:`kohya_layout`."""

    conditioning: type[Conditioning]
    pipeline_class: str
    text_folders: tuple[str, ...]
    reads: frozenset[str] = frozenset({"model.vae"})  # family-specific config keys this family honours
    kohya_layout: str = "diffusers"  # how kohya sd-scripts names this UNet's modules: "diffusers" or "sgm"
    pipeline_kwargs: dict = {}  # extra keywords of DiffusionPipeline.from_pretrained for sampling (dkto sample, eval)

    @classmethod
    def text_components(cls, options: dict) -> tuple[str, ...]:
        """The folders a text-embedding cache depends on: the text encoders and their tokenizers."""
        return cls.text_folders

    @classmethod
    def options(cls, cfg) -> dict:
        """Family-specific loading options from a config: none for the UNet families (model.vae is passed as such)."""
        return {}

    @classmethod
    def check(cls, cfg, pretrained: str, index: dict) -> None:
        """Family rules before any weight loads: the shared config checks cover the UNet families."""

    @classmethod
    def sampler(cls, scheduler):
        """The scheduler to sample with: DDIM from the pipeline's scheduler config."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(scheduler.config)

    @classmethod
    def call_options(cls, pipe) -> dict:
        """Extra keywords of ``pipe(...)``: none."""
        return {}

    @classmethod
    def network_config(cls, pretrained: str, revision: str | None = None) -> dict:
        """The config of a located pipeline's UNet (its unet/config.json), without its weights."""
        from diffusers import UNet2DConditionModel

        return dict(UNet2DConditionModel.load_config(pretrained, subfolder="unet", revision=revision))

    @classmethod
    def lora_source(cls, alpha: float, unet_config: dict) -> lora_formats.LoraSource:
        """What writing this family's LoRA file needs besides the weights (:func:`.lora_formats.write_lora`)."""
        return lora_formats.LoraSource(alpha=float(alpha), pipeline_class=cls.pipeline_class,
                                       kohya_layout=cls.kohya_layout, unet_config=dict(unet_config))

    def __init__(
        self,
        *,
        pretrained: str,
        unet: nn.Module | None,
        vae: nn.Module | None,
        noise_scheduler,
        vae_config: dict | None = None,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        lora_target_modules: tuple[str, ...] = DEFAULT_TARGETS,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        gradient_checkpointing: bool = False,
        with_reference: bool = True,
    ):
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.noise_scheduler = noise_scheduler
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        latent = dict(vae.config) if vae is not None else (vae_config or {})
        self.vae = frozen(vae, self.device, self.vae_dtype(latent, weight_dtype))
        self.latent_scale = float(latent.get("scaling_factor", 0.18215))
        self.latent_shift = float(latent.get("shift_factor") or 0.0)
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else lora_rank)
        self.unet = unet
        self.ref_unet = None
        self._tuner_layers: list[nn.Module] | None = None  # LoRA layers, found on the first reference pass
        if unet is None:  # encoders only (dkto cache)
            return
        if lora_rank > 0:
            self._add_lora(lora_rank, lora_alpha, lora_dropout, lora_target_modules)
        else:  # objectives without a reference (sft, csft) keep no frozen copy
            self.ref_unet = frozen(copy.deepcopy(unet), self.device, weight_dtype) if with_reference else None
            self.unet.requires_grad_(True)
            place(self.unet, self.device, torch.float32)
        self.unet.train()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    def vae_dtype(self, vae_config: dict, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype the frozen VAE runs in: the compute dtype (a family may keep an fp16-unsafe VAE in fp32)."""
        return weight_dtype

    # ------------------------------------------------------------------------------------------ setup

    def _add_lora(self, rank: int, alpha: float | None, dropout: float, targets: tuple[str, ...]) -> None:
        """Freeze the UNet in the compute dtype and add fp32 LoRA adapters on ``targets`` (B = 0: the policy
        starts as the reference)."""
        add_lora(self.unet, self.device, self.weight_dtype, rank, alpha, dropout, targets)

    @property
    def has_reference(self) -> bool:
        """Whether reference predictions are available (LoRA, or a full fine-tune loaded with its frozen copy)."""
        return self.lora_rank > 0 or self.ref_unet is not None

    def trainable_module(self) -> nn.Module:
        """The UNet (possibly wrapped by the trainer)."""
        return self.unet

    def wrap(self, prepare: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the UNet by ``prepare(unet)``; the unwrapped UNet stays reachable through :func:`unwrap`."""
        self.unet = prepare(self.unet)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA weights, or every UNet weight for a full fine-tune."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    def _require(self, name: str) -> nn.Module:
        """A loaded encoder, or a clear error when the run was set up without it (fully cached data)."""
        module = getattr(self, name)
        if module is None:
            raise RuntimeError(f"this model was loaded without its {name} (data.cache holds its outputs)")
        return module

    # ------------------------------------------------------------------------------------------ maths

    @torch.no_grad()
    def latent_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of the VAE posterior q(z|image): (B, 3, H, W) -> 2 x (B, C, H/f, W/f)."""
        vae = self._require("vae")
        dist = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
        return dist.mean, dist.std

    def sample_latents(self, mean: Tensor, std: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """x0 = scaling_factor * (mean + std * eps - shift): the reparameterised posterior draw, (B, C, h, w).

        ``noise_fn(shape)`` supplies eps ~ N(0, I); cached moments and fresh ones give the same x0."""
        mean, std = mean.to(self.device), std.to(self.device)
        z = mean + std * noise_fn(tuple(mean.shape)).to(mean)
        return ((z - self.latent_shift) * self.latent_scale).float()

    def encode_images(self, pixels: Tensor, noise_fn: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """x0 of images in [-1, 1]: :meth:`latent_moments` then :meth:`sample_latents`."""
        return self.sample_latents(*self.latent_moments(pixels), noise_fn)

    def timesteps(self, seed: int, draw_ids: Tensor, stream: int) -> Tensor:
        """t ~ Uniform{0, ..., T-1} per sample (Eq. 7), each from its (seed, draw id, stream) generator: (B,) int64."""
        return diffusion.per_sample_timesteps(self.num_train_timesteps, seed, draw_ids, stream)

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Noised:
        """(x_t, target) with the scheduler's forward process and prediction type (epsilon or v)."""
        noise, t = noise.to(x0), t.to(x0.device)
        return Noised(diffusion.add_noise(self.noise_scheduler, x0, noise, t),
                      diffusion.target(self.noise_scheduler, x0, noise, t))

    def unet_inputs(self, cond: Conditioning, dtype: torch.dtype | None = None) -> dict:
        """The UNet's conditioning keywords for ``cond`` (floating tensors cast to ``dtype`` when given)."""
        raise NotImplementedError

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning, *, reference: bool = False) -> Tensor:
        """UNet output for (x_t, t, c); the reference runs without grad."""
        if not reference:
            return self.unet(x_t, t, return_dict=False, **self.unet_inputs(cond))[0]
        with torch.no_grad(), self.reference_weights() as ref:
            inputs = self.unet_inputs(cond, self.weight_dtype)
            return ref(x_t.to(self.weight_dtype), t, return_dict=False, **inputs)[0]

    @contextlib.contextmanager
    def reference_weights(self) -> Iterator[nn.Module]:
        """The reference UNet: the frozen copy, or the policy with LoRA adapters disabled (restored on exit)."""
        if self.ref_unet is not None:
            yield self.ref_unet
            return
        if self.lora_rank == 0:
            raise RuntimeError("this model was loaded without a reference (with_reference=False)")
        layers = self._adapter_layers()
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield unwrap(self.unet)
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def _adapter_layers(self) -> list[nn.Module]:
        """The UNet's LoRA layers (peft tuner layers), found once. Switching them one by one is what diffusers'
        disable_adapters / enable_adapters do after walking every module of the UNet, which costs more than the
        switch itself (7.5 k modules on SDXL: 195 ms per off-and-on on this project's CPU, 70 ms without the walk)."""
        if self._tuner_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._tuner_layers = [m for m in unwrap(self.unet).modules() if isinstance(m, BaseTunerLayer)]
        return self._tuner_layers

    # ------------------------------------------------------------------------------------------ I/O

    def trainable_state(self, model_state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """LoRA weights (peft naming) or the full UNet state dict, detached on CPU; from ``model_state`` (a gathered
        whole state dict of the UNet, e.g. under FSDP) when given, else from the module itself."""
        inner = unwrap(self.unet)
        state = inner.state_dict() if model_state is None else model_state
        if self.lora_rank > 0:
            from peft.utils import get_peft_model_state_dict

            state = get_peft_model_state_dict(inner, state_dict=state)
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def model_state(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`trainable_state` output keyed like the UNet's own state dict (LoRA: peft names back to module names)."""
        if self.lora_rank == 0:
            return weights
        from peft.utils import get_peft_model_state_dict

        names = [n for n, p in unwrap(self.unet).named_parameters() if p.requires_grad]
        tagged = {n: torch.tensor(i) for i, n in enumerate(names)}  # peft renames keys; the tags say which is which
        module_key = {k: names[int(v)] for k, v in get_peft_model_state_dict(unwrap(self.unet), state_dict=tagged).items()}
        return {module_key[k]: v for k, v in weights.items()}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Restore weights saved by :meth:`trainable_state`."""
        inner = unwrap(self.unet)
        if self.lora_rank > 0:
            from peft.utils import set_peft_model_state_dict

            result = set_peft_model_state_dict(inner, state)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"checkpoint has LoRA keys this model lacks: {unexpected[:5]}")
        else:
            inner.load_state_dict(state, strict=True)

    def export(self, out_dir: str, model_state: dict[str, Tensor] | None = None) -> list[str]:
        """LoRA -> ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``); full -> ``unet/`` folder.

        ``model_state``: a gathered whole state dict of the UNet (e.g. under FSDP) to export instead of the module's."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.lora_rank > 0:
            path = out / lora_formats.LORA_FILE
            source = self.lora_source(self.lora_alpha, unwrap(self.unet).config)
            lora_formats.write_lora(path, self.trainable_state(model_state), source, fmt="diffusers")
            return [str(path)]
        unet = unwrap(self.unet) if model_state is None else self._plain_unet(model_state)
        unet.save_pretrained(out / "unet", safe_serialization=True)
        return [str(out / "unet")]

    def _plain_unet(self, state: dict[str, Tensor]) -> nn.Module:
        """An unwrapped UNet of this architecture holding ``state`` (built on the meta device, no extra copy)."""
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unwrap(self.unet).config)
        unet.load_state_dict(state, strict=True, assign=True)
        return unet

    def sampling_pipeline(self, unet: nn.Module):
        """The family's diffusers pipeline over its own modules with ``unet`` (DDIM sampler)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def pipeline(self, *, reference: bool = False) -> Iterator:
        """A sampling pipeline (DDIM sampler) over this family's modules, policy or reference weights."""
        with contextlib.ExitStack() as stack:
            unet = stack.enter_context(self.reference_weights()) if reference else unwrap(self.unet)
            pipe = self.sampling_pipeline(unet)
            stack.enter_context(decoding_in_vae_dtype(pipe.vae))
            yield pipe


@contextlib.contextmanager
def decoding_in_vae_dtype(vae: nn.Module) -> Iterator[None]:
    """While sampling, latents reach the VAE decoder in the VAE's own dtype. Under train.mixed_precision a network
    prepared by accelerate returns fp32 predictions, the scheduler turns them into fp32 latents, and a bf16 / fp16 VAE
    refuses those (the validation images of every mixed-precision run failed so)."""

    def cast(module: nn.Module, args: tuple) -> tuple:
        """The first input in the dtype of the module's weights."""
        return (args[0].to(next(module.parameters()).dtype), *args[1:])

    parts = [m for m in (getattr(vae, "post_quant_conv", None), vae.decoder) if m is not None]
    handles = [m.register_forward_pre_hook(cast) for m in parts]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
