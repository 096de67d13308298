"""Pure diffusion maths: timesteps, noise, noisy latents, targets and per-sample denoising errors.

Nothing here knows about models, configs or processes; tensors and schedulers in, tensors out.
Notation follows Diffusion-KTO (arXiv 2404.04465) §3: x0 -> x_t with noise eps at timestep t.
"""
from __future__ import annotations

import torch
from torch import Tensor


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, step, stream): counter-based randomness, so a resumed run redraws
    exactly the noise and timesteps an uninterrupted run would have drawn."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + int(stream) * 104_729) % (2**63 - 1))
    return g


def sample_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator) -> Tensor:
    """t ~ Uniform{0, ..., T-1} per sample (Eq. 7, t ~ U[0, T]). Returns (n,) int64."""
    return torch.randint(0, num_train_timesteps, (n,), generator=generator, dtype=torch.long)


def sample_noise(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """eps ~ N(0, I) drawn on the CPU from the given generator (device-independent results)."""
    return torch.randn(shape, generator=generator)


def add_noise(scheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (the forward process of the scheduler)."""
    return scheduler.add_noise(x0, noise, t)


def target(scheduler, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The regression target for the scheduler's prediction type: eps, v = sqrt(abar) eps - sqrt(1-abar) x0, or x0."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported scheduler prediction_type {kind!r}; expected epsilon, v_prediction or sample")


def per_sample_error(pred: Tensor, tgt: Tensor) -> Tensor:
    """||pred - target||^2 averaged over all but the batch dim, in fp32: (B, C, H, W) -> (B,).

    This is -log pi up to constants and scale (Gaussian likelihood), as in the official code's implicit reward."""
    return (pred.float() - tgt.float()).pow(2).flatten(1).mean(dim=1)


def per_sample_randn(shape: tuple[int, ...], seed: int, draw_ids: Tensor, stream: int) -> Tensor:
    """Standard normal noise per sample, each from its own generator seeded by (seed, draw id, stream):
    (len(draw_ids), *shape). A sample's noise depends only on its draw id, not on batch size or process count."""
    return torch.stack([sample_noise(shape, step_generator(seed, int(d), stream)) for d in draw_ids.tolist()])


def per_sample_timesteps(num_train_timesteps: int, seed: int, draw_ids: Tensor, stream: int) -> Tensor:
    """t ~ Uniform{0..T-1} per sample from its own (seed, draw id, stream) generator: (B,) int64."""
    return torch.cat([sample_timesteps(1, num_train_timesteps, step_generator(seed, int(d), stream)) for d in draw_ids.tolist()])
