"""Pure flow-matching maths (rectified flow, as SD3 / SD3.5 and FLUX.1 were trained): the noisy latent, the
velocity target, the sigma laws and the loss weightings.

Nothing here knows about models or configs: tensors and numbers in, tensors out. Notation (Esser et al., *Scaling
Rectified Flow Transformers*, arXiv 2403.03206, §2-3; docs/method.md): sigma in [0, 1] is the noise level, x0 the
clean latent, eps ~ N(0, I),

    x_sigma = (1 - sigma) x0 + sigma eps              (Eq. 1 of the flow; sigma = 1 is pure noise)
    v       = d x_sigma / d sigma = eps - x0          (the velocity the network predicts)

and the per-sample error ||v_theta(x_sigma, sigma, c) - v||^2 is :func:`diffusion_kto.diffusion.per_sample_error`.
Every draw is counter-based like :func:`diffusion_kto.diffusion.per_sample_timesteps`: a sample's sigma depends only
on (seed, draw id, stream).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .diffusion import step_generator

LAWS = ("uniform", "logit_normal", "mode")  # how sigma is drawn before any shift
WEIGHTINGS = ("none", "logit_normal", "mode", "cosmap")  # per-sample loss weights w(sigma)


def noisy(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps, per sample: (B, C, h, w), sigma (B,)."""
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0)  # (B,) -> (B, 1, 1, 1)
    return (1.0 - s) * x0 + s * noise


def velocity(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow target v = eps - x0 (independent of sigma): (B, C, h, w)."""
    return noise - x0


def draw(law: str, seed: int, draw_ids: Tensor, stream: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
         mode_scale: float = 1.29) -> Tensor:
    """Unshifted sigma per sample from its own (seed, draw id, stream) generator: (B,) float32 in (0, 1).

    uniform: sigma = u; logit_normal: sigma = 1 / (1 + exp(-(m + s n))), n ~ N(0, 1) (SD3 §3.1, "lognorm(m, s)");
    mode: sigma = 1 - u - s (cos^2(pi u / 2) - 1 + u) (SD3 Eq. 20, "mode(s)")."""
    if law not in LAWS:
        raise ValueError(f"unknown sigma law {law!r}; expected one of {', '.join(LAWS)}")
    out = []
    for d in draw_ids.tolist():
        g = step_generator(seed, int(d), stream)
        if law == "logit_normal":
            out.append(torch.sigmoid(logit_mean + logit_std * torch.randn(1, generator=g)))
        else:
            u = torch.rand(1, generator=g)
            out.append(u if law == "uniform" else mode_sigma(u, mode_scale))
    return torch.cat(out).clamp(1e-5, 1 - 1e-5)


def mode_sigma(u: Tensor, scale: float) -> Tensor:
    """SD3's mode sampling f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) (Eq. 20); monotone for s in [-1, 2/(pi-2)]."""
    return 1.0 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1.0 + u)


def shift(sigma: Tensor, s: float) -> Tensor:
    """SD3's timestep shift sigma' = s sigma / (1 + (s - 1) sigma) (SD3 Eq. 23 with s = sqrt(m / n)); s = 1 is none."""
    return s * sigma / (1.0 + (s - 1.0) * sigma)


def resolution_shift(seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent shift s = exp(mu), mu linear in the image's token count: mu = base_shift at
    base_seq_len, max_shift at max_seq_len. Then sigma' = e^mu sigma / (1 + (e^mu - 1) sigma) is :func:`shift`."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (seq_len - base_seq_len))


def logit_normal_density(sigma: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """pi_ln(sigma; m, s) = exp(-(logit sigma - m)^2 / (2 s^2)) / (s sqrt(2 pi) sigma (1 - sigma)) (SD3 Eq. 19)."""
    logit = torch.log(sigma) - torch.log1p(-sigma)
    return torch.exp(-(logit - mean) ** 2 / (2 * std**2)) / (std * math.sqrt(2 * math.pi) * sigma * (1 - sigma))


def cosmap_density(sigma: Tensor) -> Tensor:
    """pi_cosmap(sigma) = 2 / (pi - 2 pi sigma + 2 pi sigma^2) (SD3 §3.1, CosMap)."""
    return 2.0 / (math.pi - 2 * math.pi * sigma + 2 * math.pi * sigma**2)


def mode_density(sigma: Tensor, scale: float = 1.29, iterations: int = 60) -> Tensor:
    """pi_mode(sigma) = 1 / |f'(u)| at u = f^-1(sigma), f the mode map (:func:`mode_sigma`, decreasing in u), with
    f'(u) = -1 - s (1 - (pi / 2) sin(pi u)); u found by bisection."""
    lo, hi = torch.zeros_like(sigma), torch.ones_like(sigma)
    for _ in range(iterations):  # f decreases from 1 at u = 0 to 0 at u = 1
        mid = (lo + hi) / 2
        above = mode_sigma(mid, scale) > sigma
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    u = (lo + hi) / 2
    return 1.0 / (1.0 + scale * (1.0 - math.pi / 2 * torch.sin(math.pi * u))).abs()


def weighting(kind: str, sigma: Tensor, *, logit_mean: float = 0.0, logit_std: float = 1.0,
              mode_scale: float = 1.29) -> Tensor | None:
    """Per-sample loss weights w(sigma): None for ``none``, else the density of that law (SD3 §3.1: training with
    sigma ~ U(0, 1) and weight pi(sigma) has the gradient of drawing sigma ~ pi): (B,) float32."""
    sigma = sigma.float()
    if kind == "none":
        return None
    if kind == "logit_normal":
        return logit_normal_density(sigma, logit_mean, logit_std)
    if kind == "mode":
        return mode_density(sigma, mode_scale)
    if kind == "cosmap":
        return cosmap_density(sigma)
    raise ValueError(f"unknown loss weighting {kind!r}; expected one of {', '.join(WEIGHTINGS)}")
