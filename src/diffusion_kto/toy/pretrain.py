"""Pretrain the toy Stable Diffusion pipeline from scratch on the flawed shapes corpus, on a CPU.

Two stages: the VAE learns to reconstruct 32x32 renders (L1 + a small KL), its latent scale is set to
1 / std of the corpus latents, then the UNet and the text encoder learn the standard denoising loss on
those latents (with caption dropout, so classifier-free guidance works). The result is saved in diffusers
format; ``dkto toy pretrain --out DIR --seed S`` calls ``pretrain(out_dir=DIR, seed=S)``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion_kto import diffusion
from diffusion_kto.toy import model, world

STREAM_VAE, STREAM_DENOISER = 11, 12  # step_generator streams of the two stages


@dataclass(frozen=True)
class Recipe:
    """Every knob of a pretraining run; the defaults are the shipped recipe."""

    seed: int = 0
    corpus_size: int = 16384
    flaw_rate: float = 0.4
    vae_batch_size: int = 16
    vae_steps: int = 2000
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    batch_size: int = 32
    unet_steps: int = 2000
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999


def corpus_pixels(n: int, seed: int, flaw_rate: float) -> tuple[torch.Tensor, list[str]]:
    """The flawed corpus as a (n, 3, 32, 32) float tensor in [-1, 1] (the VAE's range) and its prompts."""
    images, prompts = world.make_corpus(n, seed=seed, flaw_rate=flaw_rate)
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (n, 32, 32, 3)
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0  # (n, 3, 32, 32)
    return pixels.contiguous(), prompts


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to peak, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_vae(vae, pixels: torch.Tensor, recipe: Recipe, progress: bool = True) -> None:
    """Fit the VAE to reconstruct the corpus: mean |x - decode(sample(encode(x)))| + kl_weight * KL."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    bar = tqdm(range(recipe.vae_steps), desc="vae", disable=not progress)
    for step in bar:
        g = diffusion.step_generator(recipe.seed, step, STREAM_VAE)
        x = pixels[torch.randint(0, len(pixels), (recipe.vae_batch_size,), generator=g)]  # (B, 3, 32, 32)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample  # (B, 4, 16, 16) -> (B, 3, 32, 32)
        loss = (recon - x).abs().mean() + recipe.kl_weight * posterior.kl().mean()
        set_lr(optimizer, lr_at(step, recipe.vae_steps, recipe.warmup_steps, recipe.vae_lr))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()


@torch.no_grad()
def encode_corpus(vae, pixels: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every corpus image: (n, 3, 32, 32) -> 2 x (n, 4, 16, 16), unscaled."""
    means, stds = [], []
    for chunk in pixels.split(batch_size):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_scale(means: torch.Tensor, stds: torch.Tensor, seed: int) -> float:
    """1 / std of sampled corpus latents (Stable Diffusion's scaling_factor recipe)."""
    g = diffusion.step_generator(seed, 0, STREAM_VAE + 100)
    sampled = means + stds * diffusion.sample_noise(tuple(means.shape), g)
    return float(1.0 / sampled.std())


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place."""
    torch._foreach_lerp_(ema, params, 1.0 - decay)


def prompt_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, as the pipeline pads them: (n,) -> (n, MAX_TOKENS)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_denoiser(pipe, means: torch.Tensor, stds: torch.Tensor, prompts: list[str], recipe: Recipe,
                   progress: bool = True) -> None:
    """Fit UNet + text encoder to the denoising loss on the scaled corpus latents; ends holding EMA weights."""
    unet, text_encoder, scheduler = pipe.unet, pipe.text_encoder, pipe.scheduler
    scale = pipe.vae.config.scaling_factor
    ids = prompt_ids(pipe.tokenizer, prompts)  # (n, L)
    empty = prompt_ids(pipe.tokenizer, [""])  # (1, L)
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.01)
    unet.train()
    text_encoder.train()
    bar = tqdm(range(recipe.unet_steps), desc="unet", disable=not progress)
    for step in bar:
        g = diffusion.step_generator(recipe.seed, step, STREAM_DENOISER)
        idx = torch.randint(0, len(means), (recipe.batch_size,), generator=g)
        x0 = (means[idx] + stds[idx] * diffusion.sample_noise(tuple(means[idx].shape), g)) * scale  # (B, 4, 16, 16)
        drop = torch.rand(recipe.batch_size, generator=g) < recipe.caption_dropout
        batch_ids = torch.where(drop[:, None], empty, ids[idx])  # (B, L)
        t = diffusion.sample_timesteps(recipe.batch_size, scheduler.config.num_train_timesteps, g)
        noise = diffusion.sample_noise(tuple(x0.shape), g)
        x_t = diffusion.add_noise(scheduler, x0, noise, t)
        pred = unet(x_t, t, text_encoder(batch_ids)[0]).sample
        loss = diffusion.per_sample_error(pred, diffusion.target(scheduler, x0, noise, t)).mean()
        set_lr(optimizer, lr_at(step, recipe.unet_steps, recipe.warmup_steps, recipe.unet_lr))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_update(ema, params, min(recipe.ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with torch.no_grad():
        torch._foreach_copy_(params, ema)
    unet.eval()
    text_encoder.eval()


def _lap(marks: list[float]) -> float:
    """Seconds since the last mark, rounded; appends a new mark."""
    marks.append(time.perf_counter())
    return round(marks[-1] - marks[-2], 1)


def pretrain(
    out_dir: str | Path,
    seed: int = 0,
    vae_steps: int = Recipe.vae_steps,
    unet_steps: int = Recipe.unet_steps,
    batch_size: int = Recipe.batch_size,
    corpus_size: int = Recipe.corpus_size,
    flaw_rate: float = Recipe.flaw_rate,
    progress: bool = True,
    threads: int | None = None,
) -> Path:
    """Train the toy pipeline from scratch and save it to out_dir in diffusers format (safetensors).
    The defaults are the shipped recipe; threads sets torch's CPU threads (1 is fastest on a CPU that other
    processes keep busy); returns out_dir."""
    if threads is not None:
        torch.set_num_threads(threads)
    recipe = Recipe(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, batch_size=batch_size,
                    corpus_size=corpus_size, flaw_rate=flaw_rate)
    marks = [time.perf_counter()]
    pipe = model.build_pipeline(seed)
    pixels, prompts = corpus_pixels(recipe.corpus_size, seed, recipe.flaw_rate)
    seconds = {"corpus": _lap(marks)}
    train_vae(pipe.vae, pixels, recipe, progress)
    seconds["vae"] = _lap(marks)
    means, stds = encode_corpus(pipe.vae, pixels)
    pipe.vae.register_to_config(scaling_factor=latent_scale(means, stds, seed))
    seconds["encode"] = _lap(marks)
    train_denoiser(pipe, means, stds, prompts, recipe, progress)
    seconds["unet"] = _lap(marks)
    out = model.save_pipeline(pipe, out_dir)
    seconds["total"] = round(time.perf_counter() - marks[0], 1)
    info = {"recipe": asdict(recipe), "seconds": seconds, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
