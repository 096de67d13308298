"""The paper's 2-D utility-function experiment (§6, Fig. 6) with the same ``losses.py`` functions.

A small MLP diffusion model is pretrained on points from N((0.5, 0.8), 0.04 I); liked points come from
N((0.3, 0.8), 0.01 I) and disliked ones from N((0.3, 0.6), 0.01 I). The model is then fine-tuned with
Diffusion-KTO under each utility (Kahneman-Tversky, loss-averse, risk-seeking) and, for comparison, with SFT on
the liked points. Samples before and after are drawn, plotted, and summarised by the distance of their mean
to the liked and disliked means."""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from .. import diffusion, losses

PRETRAIN_MEAN, PRETRAIN_VAR = (0.5, 0.8), 0.04
LIKED_MEAN, DISLIKED_MEAN, FEEDBACK_VAR = (0.3, 0.8), (0.3, 0.6), 0.01
METHODS = ("kt", "loss_averse", "risk_seeking", "sft")


@dataclass
class Recipe2D:
    """Settings of the 2-D experiment (chosen once, the same for every utility)."""

    seed: int = 0
    timesteps: int = 100
    pretrain_steps: int = 2000
    finetune_steps: int = 1000
    batch_size: int = 256
    lr_pretrain: float = 2e-3
    lr_finetune: float = 2e-4
    beta: float = 500.0
    desirable_ratio: float = 0.5
    samples: int = 3500  # as in the paper
    feedback_points: int = 2000  # per class


class MLPDenoiser(nn.Module):
    """eps_theta(x_t, t) for 2-D points: an MLP on the point and a sinusoidal embedding of t."""

    def __init__(self, hidden: int = 128, t_dim: int = 16):
        super().__init__()
        self.t_dim = t_dim
        self.net = nn.Sequential(nn.Linear(2 + t_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """(B, 2), (B,) -> (B, 2)."""
        freqs = torch.exp(-math.log(1000.0) * torch.arange(self.t_dim // 2, dtype=torch.float32) / (self.t_dim // 2))
        angles = t.float()[:, None] * freqs[None]  # (B, t_dim/2)
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))


def _scheduler(timesteps: int):
    """A DDPM noise schedule for the points."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=False)


def gaussian(n: int, mean: tuple[float, float], var: float, rng: torch.Generator) -> Tensor:
    """n points from N(mean, var I): (n, 2)."""
    return torch.tensor(mean) + math.sqrt(var) * torch.randn(n, 2, generator=rng)


def _errors(model: nn.Module, sched, x0: Tensor, rng: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, target) for a batch of points."""
    t = diffusion.sample_timesteps(len(x0), sched.config.num_train_timesteps, rng)
    noise = diffusion.sample_noise(tuple(x0.shape), rng)
    return diffusion.add_noise(sched, x0, noise, t), t, diffusion.target(sched, x0, noise, t)


def pretrain(recipe: Recipe2D) -> nn.Module:
    """Plain denoising training on the pretraining distribution."""
    rng = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model, sched = MLPDenoiser(), _scheduler(recipe.timesteps)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr_pretrain)
    for _ in range(recipe.pretrain_steps):
        x_t, t, tgt = _errors(model, sched, gaussian(recipe.batch_size, PRETRAIN_MEAN, PRETRAIN_VAR, rng), rng)
        loss = diffusion.per_sample_error(model(x_t, t), tgt).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def finetune(base: nn.Module, method: str, recipe: Recipe2D) -> nn.Module:
    """Diffusion-KTO with utility ``method`` (or SFT on liked points) from a frozen copy of ``base``."""
    rng = torch.Generator().manual_seed(recipe.seed + 1)
    policy, ref = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
    sched = _scheduler(recipe.timesteps)
    liked = gaussian(recipe.feedback_points, LIKED_MEAN, FEEDBACK_VAR, rng)
    disliked = gaussian(recipe.feedback_points, DISLIKED_MEAN, FEEDBACK_VAR, rng)
    opt = torch.optim.Adam(policy.parameters(), lr=recipe.lr_finetune)
    ratio = 1.0 if method == "sft" else recipe.desirable_ratio
    for _ in range(recipe.finetune_steps):
        desirable = torch.rand(recipe.batch_size, generator=rng) < ratio  # the gamma sampler (§4.2)
        idx = torch.randint(0, recipe.feedback_points, (recipe.batch_size,), generator=rng)
        x0 = torch.where(desirable[:, None], liked[idx], disliked[idx])
        x_t, t, tgt = _errors(policy, sched, x0, rng)
        policy_err = diffusion.per_sample_error(policy(x_t, t), tgt)
        if method == "sft":
            loss = losses.sft_loss(policy_err, desirable).losses.mean()
        else:
            with torch.no_grad():
                ref_err = diffusion.per_sample_error(ref(x_t, t), tgt)
            kl = losses.reference_point(policy_err, ref_err)  # unconditional model: the batch itself
            loss = losses.kto_loss(policy_err, ref_err, desirable, kl, beta=recipe.beta, utility=method).losses.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)  # as in the trainer (optim.max_grad_norm)
        opt.step()
    return policy


@torch.no_grad()
def sample(model: nn.Module, recipe: Recipe2D) -> np.ndarray:
    """Ancestral DDPM sampling of ``recipe.samples`` points: (n, 2)."""
    sched = _scheduler(recipe.timesteps)
    sched.set_timesteps(recipe.timesteps)
    rng = torch.Generator().manual_seed(recipe.seed + 2)
    x = torch.randn(recipe.samples, 2, generator=rng)
    for t in sched.timesteps:
        eps = model(x, torch.full((len(x),), int(t)))
        x = sched.step(eps, t, x, generator=rng).prev_sample
    return x.numpy()


def summarise(points: np.ndarray) -> dict[str, float]:
    """Sample mean and its distances to the liked and disliked means (None when sampling diverged)."""
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        return {"diverged": True, "finite_share": float(finite.mean())}
    mean = points.mean(0)
    return {"mean_x": float(mean[0]), "mean_y": float(mean[1]),
            "dist_to_liked": float(np.linalg.norm(mean - LIKED_MEAN)),
            "dist_to_disliked": float(np.linalg.norm(mean - DISLIKED_MEAN))}


def scatter(panels: dict[str, np.ndarray], size: int = 260, lo: float = -0.1, hi: float = 1.4) -> Image.Image:
    """Side-by-side scatter plots with the liked (green) and disliked (red) means marked."""
    pad, title = 6, 14
    canvas = Image.new("RGB", (len(panels) * (size + pad) + pad, size + title + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)

    def px(x: float, y: float, ox: int) -> tuple[float, float]:
        return ox + (x - lo) / (hi - lo) * size, pad + title + (hi - y) / (hi - lo) * size

    for i, (name, pts) in enumerate(panels.items()):
        ox = pad + i * (size + pad)
        draw.rectangle([ox, pad + title, ox + size, pad + title + size], outline=(180, 180, 180))
        draw.text((ox + 2, pad), name, fill=(0, 0, 0))
        for x, y in pts[:3500]:
            u, v = px(x, y, ox)
            if ox <= u <= ox + size and pad + title <= v <= pad + title + size:
                draw.point((u, v), fill=(40, 70, 160))
        for mean, colour in ((LIKED_MEAN, (0, 160, 0)), (DISLIKED_MEAN, (200, 0, 0))):
            u, v = px(*mean, ox)
            draw.ellipse([u - 4, v - 4, u + 4, v + 4], outline=colour, width=2)
    return canvas


def run(out_dir: str | Path, recipe: Recipe2D | None = None) -> dict:
    """Pretrain, fine-tune with every method, sample, and write ``utility2d.png`` and ``utility2d.json``."""
    recipe = recipe or Recipe2D()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = pretrain(recipe)
    panels = {"pretrained": sample(base, recipe)}
    for method in METHODS:
        panels[method] = sample(finetune(base, method, recipe), recipe)
    results = {name: summarise(pts) for name, pts in panels.items()}
    results["_seconds"] = round(time.perf_counter() - start, 1)
    results["_recipe"] = recipe.__dict__
    scatter(panels).save(out / "utility2d.png")
    (out / "utility2d.json").write_text(json.dumps(results, indent=2))
    return results
