"""FLUX.2 [dev] (Mistral Small 3.1 text encoder, guidance embedding) and FLUX.2 [klein] (Qwen3 text encoder, no
guidance embedding; step-distilled or base) through diffusers ``from_pretrained``.

Conditioning as Flux2Pipeline / Flux2KleinPipeline build it: the prompt in the text encoder's chat template ([dev]:
the pipeline's system message and a user turn, no generation prompt; [klein]: a user turn, the generation prompt,
thinking off), padded to the text context, and three hidden layers of the LLM stacked per token, (B, L, 3 D)
([dev]: layers 10, 20, 30; [klein]: 9, 18, 27). Every token is attended, padding included, as the pipelines do.

Latents: the VAE's (B, C, h, w) posterior is patchified 2x2 into (B, 4C, h/2, w/2) and normalised per channel by the
VAE's batch-norm statistics, x0 = (z - running_mean) / sqrt(running_var + eps) (the pipelines' inverse before
decoding). :meth:`Flux2.latent_moments` returns the moments of that normalised x0 (an affine map per channel), so a
cache of them needs no VAE to draw x0. Tokens are x0's pixels, (B, h/2 * w/2, 4C), with 4-axis position ids
(t, h, w, l): (0, row, column, 0) for the image and (0, 0, 0, i) for the i-th text token.

Time sigma with the velocity eps - x0 (the transformer embeds 1000 sigma, and 1000 g for the guidance value g).
BFL publishes no training law, so sigma is shifted as the pipelines sample: s = exp(mu) with mu =
``compute_empirical_mu(tokens, 50)``, 50 being both pipelines' default step count (flow.shift overrides)."""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Conditioning
from .transformer import FlowTransformerFamily
from .z_image import context

DEFAULT_GUIDANCE = 4.0  # Flux2Pipeline's guidance_scale
SHIFT_STEPS = 50  # the pipelines' num_inference_steps, at which their mu is taken


@dataclasses.dataclass(frozen=True)
class Flux2Text(Conditioning):
    """FLUX.2 conditioning: three of the LLM's hidden layers, stacked per token."""

    prompt_embeds: Tensor  # (B, L, 3 D)


def patchify(z: Tensor) -> Tensor:
    """2x2 patches into channels, channel-major: (B, C, h, w) -> (B, 4C, h/2, w/2) (Flux2Pipeline's)."""
    b, c, h, w = z.shape
    x = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, h/2, w/2)
    return x.reshape(b, c * 4, h // 2, w // 2)


def latent_ids(h: int, w: int, device) -> Tensor:
    """Position ids (0, row, column, 0) of the h x w latent tokens, row-major: (h w, 4)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    zeros = torch.zeros(h * w, dtype=torch.long)
    return torch.stack([zeros, rows.reshape(-1), cols.reshape(-1), zeros], dim=1).to(device)


def text_ids(length: int, device) -> Tensor:
    """Position ids (0, 0, 0, i) of the text tokens: (L, 4)."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids.to(device)


def stacked_layers(hidden_states: tuple[Tensor, ...], layers: tuple[int, ...]) -> Tensor:
    """The chosen hidden layers side by side per token: n x (B, L, D) -> (B, L, n D)."""
    out = torch.stack([hidden_states[k] for k in layers], dim=1)  # (B, n, L, D)
    b, n, length, d = out.shape
    return out.permute(0, 2, 1, 3).reshape(b, length, n * d)


class Flux2(FlowTransformerFamily):
    """FLUX.2 [dev] behind :class:`~diffusion_kto.models.base.DiffusionFamily` (shared body: :mod:`.transformer`)."""

    conditioning = Flux2Text
    pipeline_class = "diffusers.Flux2Pipeline"
    kohya_layout = "bfl2"  # BFL's FLUX.2 names (flux_kohya.py), which diffusers' Flux2 loader reads
    parts = {"transformer": "diffusers.Flux2Transformer2DModel", "vae": "diffusers.AutoencoderKLFlux2",
             "scheduler": "diffusers.FlowMatchEulerDiscreteScheduler",
             "text_encoder": "transformers.Mistral3ForConditionalGeneration",
             "tokenizer": "transformers.AutoTokenizer"}
    text_parts = ("text_encoder",)
    reads = FlowTransformerFamily.reads | {"model.guidance_scale"}
    layers = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers

    def __init__(self, *, guidance_scale: float | None = None, **kw):
        super().__init__(**kw)
        self.guidance = bool(self.transformer_config.get("guidance_embeds", False))
        self.guidance_scale = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
        self.tokens = context(self.text["tokenizer"])
        if self.resolution % (self.vae_factor * 2):
            raise ConfigError(f"data.resolution: {self.resolution} is not a multiple of {self.vae_factor * 2} (VAE "
                              "factor x the 2x2 patches of FLUX.2 latents)")

    @classmethod
    def options(cls, cfg) -> dict:
        """flow.*, data.resolution, model.quantize_base and model.guidance_scale."""
        return {**super().options(cfg), "guidance_scale": cfg.model.guidance_scale}

    @classmethod
    def check(cls, cfg, pretrained: str, index: dict) -> None:
        """A guidance value needs the transformer's guidance embedding."""
        super().check(cfg, pretrained, index)
        if cfg.model.guidance_scale is not None and not cls.network_config(
                pretrained, cfg.model.revision).get("guidance_embeds"):
            raise ConfigError(f"model.guidance_scale: {cfg.model.pretrained!r} has no guidance embedding (FLUX.2 "
                              "[klein] takes classifier-free guidance at sampling only); leave it unset")

    @classmethod
    def call_options(cls, pipe) -> dict:
        """Pipeline keywords that sample as this family trains: the text context."""
        return {"max_sequence_length": context(getattr(pipe, "tokenizer", None))}

    def default_shift(self) -> float:
        """exp(mu) of the pipelines' empirical mu at the image's token count and 50 steps (or the fixed shift)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        config = self.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return float(config.get("shift", 1.0))
        side = self.resolution // self.vae_factor // 2
        return float(torch.tensor(compute_empirical_mu(side * side, SHIFT_STEPS), dtype=torch.float64).exp())

    @torch.no_grad()
    def latent_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of the normalised, patchified x0: (B, 3, H, W) -> 2 x (B, 4C, H/2f, W/2f)."""
        vae = self.require("vae")
        dist = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
        bn = vae.bn
        shape = (1, -1, 1, 1)
        mean, scale = bn.running_mean.view(shape).float(), (bn.running_var.float() + bn.eps).sqrt().view(shape)
        return (patchify(dist.mean.float()) - mean) / scale, patchify(dist.std.float()) / scale

    def sample_latents(self, mean: Tensor, std: Tensor, noise_fn) -> Tensor:
        """x0 = mean + std * eps in the normalised space of :meth:`latent_moments`: (B, 4C, h, w)."""
        mean, std = mean.to(self.device), std.to(self.device)
        return (mean + std * noise_fn(tuple(mean.shape)).to(mean)).float()

    def chat(self, prompts: list[str]) -> dict:
        """[dev]'s conversations (the system message and the prompt) through the chat template, padded to the
        context: input_ids and attention_mask (B, L)."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        return self.text["tokenizer"].apply_chat_template(
            format_input(prompts=list(prompts), system_message=SYSTEM_MESSAGE), add_generation_prompt=False,
            tokenize=True, return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
            max_length=self.tokens)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Flux2Text:
        """The LLM's hidden layers ``layers`` of the chat-formatted prompts, stacked per token: (B, L, 3 D)."""
        encoder, tokens = self.require("text_encoder"), self.chat(prompts)
        out = encoder(input_ids=tokens["input_ids"].to(self.device),
                      attention_mask=tokens["attention_mask"].to(self.device), output_hidden_states=True,
                      use_cache=False)
        return Flux2Text(stacked_layers(out.hidden_states, self.layers))

    def condition(self, text: Flux2Text, batch) -> Flux2Text:
        """FLUX.2 conditions on the prompt alone (its position ids depend only on shapes)."""
        return text

    def overlong_prompts(self, prompts: list[str]) -> list[str]:
        """Prompts whose chat-formatted tokens pass the context (truncated)."""
        full = {"padding": False, "truncation": False, "return_tensors": None}
        return [p for p in prompts if len(self._untruncated(p, full)) > self.tokens]

    def _untruncated(self, prompt: str, options: dict) -> list[int]:
        """The chat-formatted token ids of one prompt without padding or truncation."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        ids = self.text["tokenizer"].apply_chat_template(format_input([prompt], SYSTEM_MESSAGE),
                                                         add_generation_prompt=False, tokenize=True,
                                                         return_dict=True, **options)["input_ids"]
        return ids[0] if ids and isinstance(ids[0], list) else ids

    def forward(self, transformer, x_t: Tensor, sigma: Tensor, cond: Flux2Text) -> Tensor:
        """Flux2Transformer2DModel on x0's pixels as tokens at time sigma, guidance model.guidance_scale ([dev]):
        (B, C, h, w) -> (B, h w, C) -> (B, C, h, w)."""
        b, c, h, w = x_t.shape
        guidance = torch.full((b,), self.guidance_scale, device=x_t.device) if self.guidance else None
        tokens = x_t.reshape(b, c, h * w).permute(0, 2, 1)  # (B, h w, C)
        out = transformer(hidden_states=tokens, timestep=sigma.to(x_t.dtype), guidance=guidance,
                          encoder_hidden_states=cond.prompt_embeds,
                          txt_ids=text_ids(cond.prompt_embeds.shape[1], x_t.device),
                          img_ids=latent_ids(h, w, x_t.device), return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)


class Flux2Klein(Flux2):
    """FLUX.2 [klein]: Qwen3 text features, no guidance embedding; sampled with its is_distilled flag."""

    pipeline_class = "diffusers.Flux2KleinPipeline"
    parts = {**Flux2.parts, "text_encoder": "transformers.Qwen3ForCausalLM"}
    layers = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers

    def __init__(self, **kw):
        super().__init__(**kw)
        from diffusers import Flux2KleinPipeline

        self.distilled = bool(Flux2KleinPipeline.load_config(self.pretrained).get("is_distilled", False))

    def pipeline_options(self) -> dict:
        """Flux2KleinPipeline's is_distilled flag, as the model folder sets it (no CFG for a distilled model)."""
        return {"is_distilled": self.distilled}

    def chat(self, prompts: list[str]) -> dict:
        """Each prompt as Flux2KleinPipeline formats it (a user turn, the generation prompt, thinking off), padded
        to the context: input_ids and attention_mask (B, L)."""
        tokenizer = self.text["tokenizer"]
        return tokenizer(self._texts(prompts), return_tensors="pt", padding="max_length", truncation=True,
                         max_length=self.tokens)

    def _texts(self, prompts: list[str]) -> list[str]:
        """The chat-formatted prompt strings."""
        return [self.text["tokenizer"].apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                           add_generation_prompt=True, enable_thinking=False)
                for p in prompts]

    def _untruncated(self, prompt: str, options: dict) -> list[int]:
        """The chat-formatted token ids of one prompt without padding or truncation."""
        return self.text["tokenizer"](self._texts([prompt])[0], truncation=False).input_ids
