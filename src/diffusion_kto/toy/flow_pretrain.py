"""Pretrain the toy flow-matching (SD3-format) pipeline on the flawed shapes corpus, on a CPU.

The SD toy's trained VAE is reused (no second VAE): the corpus is encoded once, the latent shift and scale are set to
the mean and 1 / std of the corpus latents (SD3's shift_factor and scaling_factor), then the transformer and the
three text encoders learn the rectified-flow loss ||v_theta(x_sigma, sigma, c) - (eps - x0)||^2 with sigma drawn
logit-normal (SD3's law, docs/method.md), with caption dropout (classifier-free guidance) and T5 dropout (so that
``model.drop_t5=true`` works on the toy, as SD3 was trained). ``dkto toy pretrain --family flow --out DIR`` calls
:func:`pretrain`.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion_kto import diffusion, flow
from diffusion_kto.models.sd3 import sd3_text
from diffusion_kto.toy import flow_model
from diffusion_kto.toy.pretrain import corpus_pixels, ema_update, encode_corpus, lr_at, set_lr

STREAM_FLOW, STREAM_SCALE = 13, 14  # step_generator streams


@dataclass(frozen=True)
class FlowRecipe:
    """Every knob of a flow pretraining run; the defaults are the shipped recipe."""

    seed: int = 0
    corpus_size: int = 16384
    flaw_rate: float = 0.4
    batch_size: int = 32
    steps: int = 4000
    lr: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    t5_dropout: float = 0.2
    ema_decay: float = 0.999
    logit_mean: float = 0.0
    logit_std: float = 1.0


def latent_stats(means: torch.Tensor, stds: torch.Tensor, seed: int) -> tuple[float, float]:
    """(shift_factor, scaling_factor) = (mean, 1 / std) of sampled corpus latents: x0 = (z - shift) * scale."""
    g = diffusion.step_generator(seed, 0, STREAM_SCALE)
    sampled = means + stds * diffusion.sample_noise(tuple(means.shape), g)
    return float(sampled.mean()), float(1.0 / sampled.std())


def text_conditioning(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's (prompt_embeds, pooled) for ``prompts``, with gradients (the text encoders train too)."""
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3)
    encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    return sd3_text(tokenizers, encoders, prompts, tokens=pipe.tokenizer_3.model_max_length,
                    width=pipe.transformer.config.joint_attention_dim, device="cpu")


def flow_step(pipe, x0: torch.Tensor, prompts: list[str], drop_t5: torch.Tensor, g: torch.Tensor,
              recipe: FlowRecipe) -> torch.Tensor:
    """The mean rectified-flow loss of one batch: sigma ~ logit-normal, x_sigma, v = eps - x0 (docs/method.md)."""
    embeds, pooled = text_conditioning(pipe, prompts)  # (B, 2L, D), (B, P)
    t5 = pipe.tokenizer_3.model_max_length
    keep = torch.ones_like(embeds)
    keep[drop_t5, -t5:] = 0.0  # T5 dropped: zeros in its place, as the pipeline without text_encoder_3
    sigma = torch.sigmoid(recipe.logit_mean + recipe.logit_std * torch.randn(len(x0), generator=g))  # (B,)
    noise = diffusion.sample_noise(tuple(x0.shape), g)
    x_t, target = flow.noisy(x0, noise, sigma), flow.velocity(x0, noise)
    pred = pipe.transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=embeds * keep,
                            pooled_projections=pooled, return_dict=False)[0]
    return diffusion.per_sample_error(pred, target).mean()


@torch.no_grad()
def save_ema(pipe, params: list[torch.Tensor], ema: list[torch.Tensor], out: Path) -> None:
    """Save the pipeline with the EMA weights in place of the current ones (restored after)."""
    current = [p.detach().clone() for p in params]
    torch._foreach_copy_(params, ema)
    flow_model.save_pipeline(pipe, out)
    torch._foreach_copy_(params, current)


def train_flow(pipe, means: torch.Tensor, stds: torch.Tensor, prompts: list[str], recipe: FlowRecipe,
               progress: bool = True, snapshots: Path | None = None, snapshot_every: int = 0) -> None:
    """Fit the transformer and text encoders to the flow loss on the shifted, scaled corpus latents; ends holding the
    EMA weights. ``snapshot_every`` > 0 saves the EMA pipeline to ``snapshots/step-N`` along the way (to watch it)."""
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    modules = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    params = [p for m in modules for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    for m in modules:
        m.train()
    bar = tqdm(range(recipe.steps), desc="transformer", disable=not progress)
    for step in bar:
        g = diffusion.step_generator(recipe.seed, step, STREAM_FLOW)
        idx = torch.randint(0, len(means), (recipe.batch_size,), generator=g)
        z = means[idx] + stds[idx] * diffusion.sample_noise(tuple(means[idx].shape), g)
        x0 = (z - shift) * scale  # (B, 4, 16, 16)
        drop = (torch.rand(recipe.batch_size, generator=g) < recipe.caption_dropout).tolist()
        drop_t5 = torch.rand(recipe.batch_size, generator=g) < recipe.t5_dropout
        batch_prompts = ["" if d else prompts[i] for d, i in zip(drop, idx.tolist())]
        loss = flow_step(pipe, x0, batch_prompts, drop_t5, g, recipe)
        set_lr(optimizer, lr_at(step, recipe.steps, recipe.warmup_steps, recipe.lr))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema_update(ema, params, min(recipe.ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < recipe.steps:
            save_ema(pipe, params, ema, snapshots / f"step-{step + 1:05d}")
    with torch.no_grad():
        torch._foreach_copy_(params, ema)
    for m in modules:
        m.eval()


def pretrain(out_dir: str | Path, seed: int = 0, steps: int = FlowRecipe.steps, batch_size: int = FlowRecipe.batch_size,
             corpus_size: int = FlowRecipe.corpus_size, progress: bool = True, threads: int | None = None,
             snapshot_every: int = 0) -> Path:
    """Train the toy flow pipeline (around the SD toy's VAE) and save it to out_dir in diffusers format; returns it.
    ``snapshot_every`` > 0 also saves EMA snapshots beside it, in ``<out_dir>-snapshots/``."""
    if threads is not None:
        torch.set_num_threads(threads)
    recipe = FlowRecipe(seed=seed, steps=steps, batch_size=batch_size, corpus_size=corpus_size)
    marks = [time.perf_counter()]
    lap = lambda: round(-marks[-1] + (marks.append(time.perf_counter()) or marks[-1]), 1)  # noqa: E731
    pipe = flow_model.build_pipeline(seed)
    pixels, prompts = corpus_pixels(recipe.corpus_size, seed, recipe.flaw_rate)
    seconds = {"corpus": lap()}
    pipe.vae.requires_grad_(False)
    means, stds = encode_corpus(pipe.vae, pixels)
    shift, scale = latent_stats(means, stds, seed)
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    seconds["encode"] = lap()
    train_flow(pipe, means, stds, prompts, recipe, progress, Path(f"{out_dir}-snapshots"), snapshot_every)
    seconds["transformer"] = lap()
    out = flow_model.save_pipeline(pipe, out_dir)
    seconds["total"] = round(time.perf_counter() - marks[0], 1)
    info = {"recipe": asdict(recipe), "seconds": seconds, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform()}
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
