"""Pure loss maths for Diffusion-KTO and its baselines (arXiv 2404.04465).

Tensors in, per-sample tensors out: no model, no accelerator, no config. The caller reduces the per-sample
losses and computes anything that crosses processes (the reference point is all-reduced by the trainer and
passed in as ``kl``).

Notation (paper §3–4): ``policy_err`` / ``ref_err`` are per-sample denoising errors ||eps_theta - target||^2 of
the policy and the frozen reference on the same x_t, t, noise and prompt. Since -log pi(x_{t-1}|x_t) is the
denoising error up to constants, the implicit reward (log-ratio) is g = ref_err - policy_err.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _kahneman_tversky(z: Tensor) -> Tensor:
    """U(z) = sigma(z): concave for gains, convex for losses (paper §4.2, the KTO default)."""
    return torch.sigmoid(z)


def _loss_averse(z: Tensor) -> Tensor:
    """U(z) = log sigma(z): concave everywhere, a Diffusion-DPO-like utility (paper App. D.4)."""
    return F.logsigmoid(z)


def _risk_seeking(z: Tensor) -> Tensor:
    """U(z) = -log sigma(-z) = softplus(z): convex everywhere (paper App. D.4)."""
    return -F.logsigmoid(-z)


UTILITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "kt": _kahneman_tversky,
    "loss_averse": _loss_averse,
    "risk_seeking": _risk_seeking,
}


class KTOOutput(NamedTuple):
    """Per-sample KTO losses plus detached diagnostics."""

    losses: Tensor  # (B,) not reduced
    rewards: Tensor  # (B,) beta * g, detached
    margins: Tensor  # (B,) z = s * beta * (g - kl), detached; > 0 means the sample is on the right side
    accuracy: Tensor  # () share of samples with z > 0


class SFTOutput(NamedTuple):
    """Per-sample supervised losses (zero for disliked samples)."""

    losses: Tensor  # (B,)


def implicit_reward(policy_err: Tensor, ref_err: Tensor) -> Tensor:
    """g = ref_err - policy_err, the log-ratio log pi_theta / pi_ref up to scale (Eq. 7, Gaussian likelihood)."""
    return ref_err - policy_err


def reference_point(policy_err: Tensor, ref_err: Tensor) -> Tensor:
    """Q_ref = max(0, mean(ref_err - policy_err)), detached (paper §4.1; KTO's KL estimate).

    Pass the errors of the whole (gathered) batch: the mean is taken before the clamp, as in KTO."""
    if policy_err.numel() == 0:
        raise ValueError("reference_point needs at least one sample")
    return implicit_reward(policy_err, ref_err).detach().float().mean().clamp(min=0)


def centred_reference_point(g: Tensor, global_mean: Tensor) -> Tensor:
    """Q_ref = mean(g) *with* its gradient and no clamp: valued at the global batch mean of g, differentiated
    through this process's samples' g, so that every z_i = s_i beta (g_i - Q_ref) is unchanged by a common shift of
    all g (sum_k dz_i/dg_k = 0): the loss cannot fall by moving every implicit reward at once (docs/method.md).

    g: (B,) this process's implicit rewards (with gradient); global_mean: () the mean of g over the gathered batch."""
    if g.numel() == 0:
        raise ValueError("centred_reference_point needs at least one sample")
    local = g.float().mean()
    return local - local.detach() + global_mean.detach().float()


def prompt_reference_point(policy_err: Tensor, ref_err: Tensor, groups: Tensor,
                           local_groups: Tensor | None = None) -> Tensor:
    """Per-sample Q_ref = max(0, mean of g = ref_err - policy_err over the samples of the same prompt), detached.

    The reference point of §4.1 taken per prompt (as group-relative online methods normalise per prompt), so that a
    prompt whose images are mostly liked does not move every sample's reference. ``policy_err``, ``ref_err``,
    ``groups``: (N,) over the whole (gathered) batch, ``groups`` an integer id per prompt; ``local_groups``: (B,) the
    ids of the samples to return Q_ref for (default: all N). A prompt with a single sample in the batch takes the
    batch-wide mean (its own g would make z = 0)."""
    if policy_err.numel() == 0:
        raise ValueError("prompt_reference_point needs at least one sample")
    g = implicit_reward(policy_err, ref_err).detach().float()  # (N,)
    local = groups if local_groups is None else local_groups
    same = (local.reshape(-1, 1) == groups.reshape(1, -1)).float()  # (B, N)
    count = same.sum(dim=1)  # (B,)
    per_prompt = (same @ g) / count.clamp(min=1)  # (B,)
    return torch.where(count >= 2, per_prompt, g.mean()).clamp(min=0)


class RunningReference(NamedTuple):
    """A bias-corrected exponential running mean of reference-point estimates (the amortized Q_ref)."""

    value: Tensor  # () the current Q_ref, the bias-corrected mean m_n / (1 - d^n); 0 before any estimate
    raw: Tensor  # () m_n = d m_{n-1} + (1 - d) q_n, with m_0 = 0
    count: int  # n, estimates folded in so far


def running_reference(previous: RunningReference | None, estimate: Tensor, decay: float) -> RunningReference:
    """Fold one Q_ref estimate q_n into m_n = d m_{n-1} + (1 - d) q_n; value = m_n / (1 - d^n) (Adam-style).

    The bias correction makes the value a weighted mean of the estimates so far, weights d^(n-i) normalised:
    q_1 after one estimate, (d q_1 + q_2) / (1 + d) after two; d = 0 keeps only the newest estimate (the
    paper's per-batch Q_ref). Stays >= 0 because every estimate is (§4.1 clamps each one)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    estimate = estimate.detach().float()
    raw_prev = previous.raw.to(estimate) if previous is not None else torch.zeros_like(estimate)
    count = (previous.count if previous is not None else 0) + 1
    raw = decay * raw_prev + (1.0 - decay) * estimate
    return RunningReference(value=raw / (1.0 - decay**count), raw=raw, count=count)


def kto_loss(
    policy_err: Tensor,
    ref_err: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    *,
    beta: float,
    utility: str = "kt",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_grad: bool = False,
) -> KTOOutput:
    """Diffusion-KTO (Eq. 8): loss_i = lambda_y (1 - U(s_i * beta * (g_i - Q_ref))), s = +1 liked, -1 disliked.

    policy_err, ref_err: (B,) float; desirable: (B,) bool; kl: the reference point Q_ref, () or (B,), detached here
    unless ``reference_grad`` (the centred Q_ref, whose gradient is part of the objective)."""
    if utility not in UTILITIES:
        raise ValueError(f"unknown utility {utility!r}; expected one of {sorted(UTILITIES)}")
    desirable = desirable.to(device=policy_err.device, dtype=torch.bool)
    kl = torch.as_tensor(kl, device=policy_err.device).to(policy_err.dtype)
    kl = kl if reference_grad else kl.detach()
    g = implicit_reward(policy_err, ref_err)  # (B,)
    sign = desirable.to(policy_err.dtype) * 2 - 1  # (B,) +1 / -1
    z = sign * beta * (g - kl)  # (B,)
    weight = torch.where(
        desirable,
        torch.as_tensor(desirable_weight, dtype=policy_err.dtype, device=policy_err.device),
        torch.as_tensor(undesirable_weight, dtype=policy_err.dtype, device=policy_err.device),
    )
    losses = weight * (1 - UTILITIES[utility](z))  # (B,)
    z = z.detach()
    return KTOOutput(losses=losses, rewards=(beta * g).detach(), margins=z, accuracy=(z > 0).float().mean())


def sft_loss(policy_err: Tensor, desirable: Tensor) -> SFTOutput:
    """Supervised fine-tuning baseline: the denoising loss on liked images only (paper §5, "SFT")."""
    return SFTOutput(losses=policy_err * desirable.to(device=policy_err.device, dtype=policy_err.dtype))


class DPOOutput(NamedTuple):
    """Per-pair Diffusion-DPO losses plus detached diagnostics."""

    losses: Tensor  # (P,) not reduced
    margins: Tensor  # (P,) the argument of log-sigmoid, detached; > 0 means the preferred image is favoured
    accuracy: Tensor  # () share of pairs with margin > 0


def dpo_loss(policy_err_w: Tensor, policy_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, *,
             beta: float) -> DPOOutput:
    """Diffusion-DPO baseline: -log sigma(-beta/2 ((policy_w - policy_l) - (ref_w - ref_l))) per pair.

    w / l are the preferred / rejected image of a pair, denoised with the same noise and t (Wallace et al. 2024,
    Eq. 14 with T*omega(lambda_t) folded into beta, as in the official Diffusion-DPO code)."""
    inside = -0.5 * beta * ((policy_err_w - policy_err_l) - (ref_err_w - ref_err_l))  # (P,)
    margins = inside.detach()
    return DPOOutput(losses=-F.logsigmoid(inside), margins=margins, accuracy=(margins > 0).float().mean())


# ------------------------------------------------------------------------------------ beyond the paper (docs/method.md)


class NFTOutput(NamedTuple):
    """Per-sample DiffusionNFT losses plus detached diagnostics."""

    losses: Tensor  # (B,) not reduced
    positive_err: Tensor  # (B,) ||v+ - target||^2 (weighted), detached
    negative_err: Tensor  # (B,) ||v- - target||^2 (weighted), detached
    deviation: Tensor  # (B,) ||v_theta - v_ref||^2, detached


def nft_loss(policy_out: Tensor, ref_out: Tensor, target: Tensor, desirable: Tensor, *, beta: float,
             weight: Tensor | None = None) -> NFTOutput:
    """DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): r ||v+ - v||^2 / beta + (1 - r) ||v- - v||^2 / beta.

    v+ = beta v_theta + (1 - beta) v_ref and v- = (1 + beta) v_ref - beta v_theta are the implicit positive and
    negative policies, r = 1 liked / 0 disliked. ``policy_out``, ``ref_out``, ``target``: (B, ...) network outputs
    in any parameterisation (epsilon, v, flow velocity; docs/method.md says why the algebra is the same);
    ``weight``: (B,) the family's per-sample weight or None. Computed in fp32, like the errors."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    pol, ref, tgt = policy_out.float(), ref_out.detach().float(), target.float()  # (B, ...)
    positive = beta * pol + (1 - beta) * ref  # (B, ...)
    negative = (1 + beta) * ref - beta * pol  # (B, ...)
    pos_err = (positive - tgt).pow(2).flatten(1).mean(dim=1)  # (B,)
    neg_err = (negative - tgt).pow(2).flatten(1).mean(dim=1)  # (B,)
    if weight is not None:
        pos_err, neg_err = pos_err * weight.to(pos_err), neg_err * weight.to(neg_err)
    liked = desirable.to(device=pos_err.device, dtype=torch.bool)
    losses = torch.where(liked, pos_err, neg_err) / beta  # (B,)
    deviation = (pol.detach() - ref).pow(2).flatten(1).mean(dim=1)  # (B,)
    return NFTOutput(losses=losses, positive_err=pos_err.detach(), negative_err=neg_err.detach(), deviation=deviation)


class RewardShift(NamedTuple):
    """BCO's running reward statistics: sums (float64, as Python floats: exact through JSON) and counts per class."""

    liked_sum: float = 0.0
    liked_count: int = 0
    disliked_sum: float = 0.0
    disliked_count: int = 0


def update_reward_shift(previous: RewardShift, rewards: Tensor, desirable: Tensor) -> RewardShift:
    """Fold a (gathered) batch of rewards beta*g, (N,), into the running sums of each class (float64)."""
    r = rewards.detach().double().cpu()  # (N,)
    liked = desirable.detach().to(dtype=torch.bool).cpu()  # (N,)
    return RewardShift(liked_sum=previous.liked_sum + float(r[liked].sum()),
                       liked_count=previous.liked_count + int(liked.sum()),
                       disliked_sum=previous.disliked_sum + float(r[~liked].sum()),
                       disliked_count=previous.disliked_count + int((~liked).sum()))


def reward_shift_value(state: RewardShift, mode: str = "balanced") -> float:
    """delta: ``balanced`` = (mean liked reward + mean disliked reward) / 2, the delta of the tightest bound
    log sigma(r_w - r_l) >= log sigma(r_w - delta) + log sigma(delta - r_l) (docs/method.md), a class not seen yet
    leaving the other's mean; ``pooled`` = the mean of every reward (TRL's BCOTrainer). 0 before any reward."""
    ln, dn = state.liked_count, state.disliked_count
    if mode == "pooled":
        return (state.liked_sum + state.disliked_sum) / (ln + dn) if ln + dn else 0.0
    if mode != "balanced":
        raise ValueError(f"unknown reward shift {mode!r}; expected balanced or pooled")
    means = [s / n for s, n in ((state.liked_sum, ln), (state.disliked_sum, dn)) if n]
    return sum(means) / len(means) if means else 0.0


class BCOOutput(NamedTuple):
    """Per-sample BCO losses plus detached diagnostics."""

    losses: Tensor  # (B,) not reduced
    rewards: Tensor  # (B,) beta * g, detached
    margins: Tensor  # (B,) s (beta g - delta), detached; > 0 means the classifier puts the sample on its side
    accuracy: Tensor  # () share of samples with margin > 0


def bco_loss(policy_err: Tensor, ref_err: Tensor, desirable: Tensor, delta: Tensor | float, *,
             beta: float) -> BCOOutput:
    """BCO (Jung et al. 2024, arXiv 2404.04656): -log sigma(beta g - delta) liked, -log sigma(-(beta g - delta))
    disliked, g = ref_err - policy_err. policy_err, ref_err: (B,); desirable: (B,) bool; delta: scalar, no gradient."""
    desirable = desirable.to(device=policy_err.device, dtype=torch.bool)
    delta = torch.as_tensor(delta, dtype=policy_err.dtype, device=policy_err.device).detach()
    rewards = beta * implicit_reward(policy_err, ref_err)  # (B,)
    sign = desirable.to(policy_err.dtype) * 2 - 1  # (B,) +1 / -1
    z = sign * (rewards - delta)  # (B,)
    margins = z.detach()
    return BCOOutput(losses=-F.logsigmoid(z), rewards=rewards.detach(), margins=margins,
                     accuracy=(margins > 0).float().mean())


class PairTerms(NamedTuple):
    """Same-prompt liked x disliked comparisons of each row against every column (the gathered batch)."""

    losses: Tensor  # (B,) mean of -log sigma(m_ij) over the row's partners; 0 for a row without one
    partners: Tensor  # (B,) int64 number of partners
    margins: Tensor  # (B, N) m_ij = s_i beta (g_i - g_j), detached; meaningful where ``mask``
    mask: Tensor  # (B, N) bool: j has the row's prompt and the other label


def same_prompt_pairs(g: Tensor, desirable: Tensor, groups: Tensor, g_all: Tensor, desirable_all: Tensor,
                      groups_all: Tensor, *, beta: float, pairable: Tensor | None = None,
                      pairable_all: Tensor | None = None, draws: Tensor | None = None,
                      draws_all: Tensor | None = None) -> PairTerms:
    """Per-row Bradley-Terry terms over same-prompt pairs: -log sigma(beta (g_w - g_l)) (Diffusion-DPO's form on the
    implicit rewards, docs/method.md), s_i = +1 liked / -1 disliked.

    Rows: this process's samples, g (B,) with gradient; columns: the whole batch's, g_all (N,) detached (the row's
    own copy never pairs with it: same label). ``pairable`` / ``pairable_all``: which rows / columns may pair;
    ``draws`` / ``draws_all``: when given, a row pairs only with columns of its own draw (one noise and t)."""
    liked, liked_all = desirable.to(torch.bool), desirable_all.to(torch.bool)
    mask = (groups.reshape(-1, 1) == groups_all.reshape(1, -1)) & (liked.reshape(-1, 1) != liked_all.reshape(1, -1))
    if draws is not None and draws_all is not None:
        mask = mask & (draws.reshape(-1, 1) == draws_all.reshape(1, -1))
    if pairable is not None:
        mask = mask & pairable.reshape(-1, 1).to(torch.bool)
    if pairable_all is not None:
        mask = mask & pairable_all.reshape(1, -1).to(torch.bool)  # (B, N)
    sign = liked.to(g.dtype) * 2 - 1  # (B,)
    m = sign.reshape(-1, 1) * beta * (g.reshape(-1, 1) - g_all.detach().to(g).reshape(1, -1))  # (B, N)
    terms = torch.where(mask, -F.logsigmoid(m), torch.zeros_like(m))  # (B, N)
    partners = mask.sum(dim=1)  # (B,)
    losses = terms.sum(dim=1) / partners.clamp(min=1).to(g.dtype)  # (B,)
    return PairTerms(losses=losses, partners=partners, margins=m.detach(), mask=mask)
