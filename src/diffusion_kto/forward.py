"""The denoising forward of one micro-batch, for any model family (paper Eq. 7): per-sample draws of noise and
timestep, x_t and the target, then the policy's and the reference's predictions -> :class:`Errors`.

Every random draw of a sample comes from (seed, draw id, stream), so a resumed run, or the same global batch split
over more processes, draws exactly what an uninterrupted one would. The family decides the timestep law (discrete t,
or sigma for flow matching), the forward process and the target; nothing here knows which family it has.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import diffusion
from .data import Batch
from .models.base import Conditioning, DiffusionFamily
from .objectives import Errors, ForwardPlan, Outputs

# Streams of the counter-based randomness: each sample's draws depend only on (seed, draw id, stream).
STREAM_TIMESTEP, STREAM_NOISE, STREAM_LATENT = 1, 2, 3


def clean_latents(family: DiffusionFamily, batch: Batch, seed: int) -> Tensor:
    """x0 = scale * (mean + std * eps - shift) of each image's VAE posterior (cached, or encoded now), eps from
    (seed, draw id): (B, C, h, w)."""
    draws = batch.draw_ids
    noise_fn = lambda shape: diffusion.per_sample_randn(shape[1:], seed, draws, STREAM_LATENT)  # noqa: E731
    if batch.latent_mean is not None:
        mean, std = (t.to(family.device, family.weight_dtype) for t in (batch.latent_mean, batch.latent_std))
        return family.sample_latents(mean, std, noise_fn)
    return family.encode_images(batch.pixels, noise_fn)


def _error(pred: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    """||pred - target||^2 per sample (B,), times the family's per-sample weight when it has one."""
    err = diffusion.per_sample_error(pred, target)
    return err if weight is None else err * weight.to(err)


def denoising_errors(family: DiffusionFamily, x0: Tensor, cond: Conditioning, draw_ids: Tensor, seed: int,
                     plan: ForwardPlan) -> Errors:
    """Policy (with gradient) and, as ``plan`` asks, reference and mismatched-prompt errors on shared draws, and the
    raw predictions behind them (``plan.outputs``: the same tensors the errors are computed from).

    The reference passes on the batch and on its first n samples with prompts rolled by one (unrelated pairs) are
    one batched no-grad pass; the policy's grad pass runs last, so that no no-grad activations coexist with its saved
    ones (peak memory)."""
    noise = diffusion.per_sample_randn(tuple(x0.shape[1:]), seed, draw_ids, STREAM_NOISE)  # (B, C, h, w)
    t = family.timesteps(seed, draw_ids, STREAM_TIMESTEP).to(x0.device)  # (B,)
    x_t, target, weight = family.noisy(x0, noise, t)
    if not plan.reference:
        pred = family.predict(x_t, t, cond)
        outputs = Outputs(policy=pred, target=target, weight=weight) if plan.outputs else None
        return Errors(policy=_error(pred, target, weight), outputs=outputs, draws=draw_ids)
    mismatched: dict[str, Tensor] = {}
    if plan.mismatched:
        b, n = len(x_t), plan.mismatched
        x_n, t_n, cond_n = x_t[:n], t[:n], cond[:n].mismatched()
        w_n = None if weight is None else weight[:n]
        ref = family.predict(torch.cat([x_t, x_n]), torch.cat([t, t_n]), type(cond).cat([cond, cond_n]), reference=True)
        ref_match, ref_mis = ref[:b], ref[b:]  # (B + n, ...) -> (B, ...), (n, ...)
        with torch.no_grad():
            mismatched["policy_mismatched"] = _error(family.predict(x_n, t_n, cond_n), target[:n], w_n)
        mismatched["reference_mismatched"] = _error(ref_mis, target[:n], w_n)
    else:
        ref_match = family.predict(x_t, t, cond, reference=True)
    reference = _error(ref_match, target, weight)
    pred = family.predict(x_t, t, cond)
    outputs = Outputs(policy=pred, target=target, reference=ref_match, weight=weight) if plan.outputs else None
    return Errors(policy=_error(pred, target, weight), reference=reference, outputs=outputs, draws=draw_ids,
                  **mismatched)
