"""The paper's 2-D utility-function experiment (§6, Fig. 6) with the same ``losses.py`` functions.

A small MLP diffusion model is pretrained on points from N((0.5, 0.8), 0.04 I); liked points come from
N((0.3, 0.8), 0.01 I) and disliked ones from N((0.3, 0.6), 0.01 I). The model is then fine-tuned with
Diffusion-KTO under each utility (Kahneman-Tversky, loss-averse, risk-seeking) and, for comparison, with SFT on
the liked points. Samples before and after are drawn, plotted, and summarised by the distance of their mean
to the liked and disliked means.

One recipe serves every utility. beta is not tuned on outcomes: by default it is set from the SFT fine-tune (which
does not use beta) so that beta * |g| is about 1 for the typical per-sample log-ratio g a plain fine-tune of the same
length produces (``beta_from_sft``); the same beta grid is also run for every utility and reported."""
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
from ..evaluation.report import Table, jsonable, render_markdown
from ..provenance import commit, machine

PRETRAIN_MEAN, PRETRAIN_VAR = (0.5, 0.8), 0.04
LIKED_MEAN, DISLIKED_MEAN, FEEDBACK_VAR = (0.3, 0.8), (0.3, 0.6), 0.01
UTILITIES = ("kt", "loss_averse", "risk_seeking")
METHODS = (*UTILITIES, "sft")
WINDOW = (-0.1, 1.4)  # the square the PNG shows
BLOWUP_FACTOR = 10.0  # a fine-tune has blown up once its denoising error is this many times the reference's


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
    beta: float | None = None  # None: set by beta_from_sft, the same for every utility
    beta_grid: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0, 1000.0)  # run for every utility alike
    desirable_ratio: float = 0.8  # gamma, the paper's default (App. A.1)
    samples: int = 3500  # as in the paper
    feedback_points: int = 2000  # per class
    trace_every: int = 20  # fine-tune steps between diagnostics (and the resolution of blowup_step)


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


def step_stats(step: int, policy_err: Tensor, ref_err: Tensor, kl: Tensor, beta: float | None) -> dict:
    """Magnitudes of one fine-tune batch: Q_ref, |g|, |z| = |beta (g - Q_ref)| and the error ratio (Eq. 8)."""
    g = losses.implicit_reward(policy_err, ref_err).detach()
    z = None if beta is None else (beta * (g - kl)).abs()
    return {"step": step, "q_ref": float(kl), "median_abs_g": float(g.abs().median()),
            "median_abs_z": None if z is None else float(z.median()),
            "saturated_share": None if z is None else float((z > 5).float().mean()),
            "err_ratio": float(policy_err.detach().mean() / ref_err.mean())}


def finetune(base: nn.Module, method: str, recipe: Recipe2D,
             beta: float | None = None) -> tuple[nn.Module, list[dict]]:
    """Diffusion-KTO with utility ``method`` (or SFT on liked points) from a frozen copy of ``base`` (§4, §6).

    Returns the policy and a trace of ``step_stats`` every ``recipe.trace_every`` steps (SFT takes no beta)."""
    if (beta is None) != (method == "sft"):
        raise ValueError(f"{method!r}: beta is required for a utility and meaningless for SFT")
    rng = torch.Generator().manual_seed(recipe.seed + 1)
    policy, ref = copy.deepcopy(base), copy.deepcopy(base).requires_grad_(False)
    sched = _scheduler(recipe.timesteps)
    liked = gaussian(recipe.feedback_points, LIKED_MEAN, FEEDBACK_VAR, rng)
    disliked = gaussian(recipe.feedback_points, DISLIKED_MEAN, FEEDBACK_VAR, rng)
    opt = torch.optim.Adam(policy.parameters(), lr=recipe.lr_finetune)
    ratio = 1.0 if method == "sft" else recipe.desirable_ratio
    trace = []
    for step in range(recipe.finetune_steps):
        desirable = torch.rand(recipe.batch_size, generator=rng) < ratio  # the gamma sampler (§4.2)
        idx = torch.randint(0, recipe.feedback_points, (recipe.batch_size,), generator=rng)
        x0 = torch.where(desirable[:, None], liked[idx], disliked[idx])
        x_t, t, tgt = _errors(policy, sched, x0, rng)
        policy_err = diffusion.per_sample_error(policy(x_t, t), tgt)
        with torch.no_grad():
            ref_err = diffusion.per_sample_error(ref(x_t, t), tgt)
        kl = losses.reference_point(policy_err, ref_err)  # unconditional model: the batch itself
        if method == "sft":
            loss = losses.sft_loss(policy_err, desirable).losses.mean()
        else:
            loss = losses.kto_loss(policy_err, ref_err, desirable, kl, beta=beta, utility=method).losses.mean()
        if step % recipe.trace_every == 0 or step == recipe.finetune_steps - 1:
            trace.append(step_stats(step, policy_err, ref_err, kl, beta))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)  # as in the trainer (optim.max_grad_norm)
        opt.step()
    return policy, trace


def beta_from_sft(trace: list[dict], grid: tuple[float, ...]) -> float:
    """The grid beta nearest (log scale) to 1 / median |g| over the last quarter of an SFT trace (§6 recipe rule)."""
    tail = trace[-max(1, len(trace) // 4):]
    g = float(np.median([row["median_abs_g"] for row in tail]))
    target = 1.0 / max(g, 1e-12)
    return min(grid, key=lambda b: abs(math.log(b) - math.log(target)))


def blowup_step(trace: list[dict], factor: float = BLOWUP_FACTOR) -> int | None:
    """The first traced step whose denoising error is ``factor`` times the reference's or not finite, else None."""
    for row in trace:
        if not math.isfinite(row["err_ratio"]) or row["err_ratio"] > factor:
            return int(row["step"])
    return None


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


def summarise(points: np.ndarray) -> dict[str, float | None]:
    """Mean and spread (rms std per axis) of the finite samples, the mean's distances to the liked and disliked
    means, and the finite / in-window shares (§6, Fig. 6)."""
    finite = np.isfinite(points).all(axis=1)
    inside = finite & ((points >= WINDOW[0]) & (points <= WINDOW[1])).all(axis=1)
    row: dict[str, float | None] = {"finite_share": float(finite.mean()), "in_window_share": float(inside.mean())}
    if not finite.any():
        return {**row, "mean_x": None, "mean_y": None, "spread": None, "dist_to_liked": None, "dist_to_disliked": None}
    mean = points[finite].mean(0)
    return {**row, "mean_x": float(mean[0]), "mean_y": float(mean[1]),
            "spread": float(np.sqrt(points[finite].var(0).mean())),
            "dist_to_liked": float(np.linalg.norm(mean - LIKED_MEAN)),
            "dist_to_disliked": float(np.linalg.norm(mean - DISLIKED_MEAN))}


def scatter(panels: dict[str, np.ndarray], size: int = 260, lo: float = WINDOW[0],
            hi: float = WINDOW[1]) -> Image.Image:
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


def evaluate(base: nn.Module, method: str, recipe: Recipe2D, beta: float | None) -> tuple[np.ndarray, dict]:
    """Fine-tune with ``method`` at ``beta``, sample, and summarise the samples and the trace's last row."""
    policy, trace = finetune(base, method, recipe, beta)
    points = sample(policy, recipe)
    return points, {**summarise(points), "blowup_step": blowup_step(trace), "last": trace[-1], "trace": trace}


def _fmt(value, digits: int = 3) -> str:
    """A table cell: '-' for None, a number with ``digits`` significant figures otherwise."""
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}g}"


def _row(name: str, res: dict) -> list[str]:
    """One table row: mean, spread, distances, shares, blow-up step and the last traced magnitudes."""
    mean = "-" if res["mean_x"] is None else f"({res['mean_x']:.3g}, {res['mean_y']:.3g})"
    last = res.get("last", {})
    return [name, mean, _fmt(res["spread"]), _fmt(res["dist_to_liked"]), _fmt(res["dist_to_disliked"]),
            _fmt(res["finite_share"]), _fmt(res["in_window_share"]), _fmt(res.get("blowup_step")), _fmt(last.get("q_ref")),
            _fmt(last.get("median_abs_g")), _fmt(last.get("median_abs_z")), _fmt(last.get("saturated_share"))]


HEADER = ["method", "sample mean", "spread", "dist to liked", "dist to disliked", "finite share", "in-window share",
          f"blow-up step (err > {BLOWUP_FACTOR:g}x ref)", "last Q_ref", "last median abs g", "last median abs z",
          "last share abs z > 5"]


def markdown(results: dict, command: str) -> str:
    """utility2d.md: provenance, the headline table at the chosen beta, the beta grid, the image (§6, Fig. 6)."""
    beta = results["_beta"]
    headline = Table(HEADER, [_row(name, results[name]) for name in ("pretrained", *METHODS)],
                     caption=f"every utility at beta = {beta:g}; SFT takes no beta; 'last' = the last fine-tune batch")
    rows = [_row(f"{b:g} {u}", res) for b, by_u in results["_grid"].items() for u, res in by_u.items()]
    grid = Table(["beta, utility", *HEADER[1:]], rows, caption="the same recipe for every utility and beta")
    info = {"command": command, "commit": results["_commit"], "machine": machine(),
            "wall time (s)": results["_seconds"], "beta": f"{beta:g} ({results['_beta_source']})",
            "recipe": {k: v for k, v in results["_recipe"].items() if k != "beta"}}
    notes = ["g = ref_err - policy_err per sample (losses.implicit_reward); z = beta (g - Q_ref), the argument of U.",
             "Q_ref = max(0, batch mean of g): the model is unconditional, so the 'unrelated pairs' are the batch.",
             "Spread: rms of the per-axis std of the finite samples (pretraining data 0.2, liked and disliked 0.1).",
             f"Distances are from the mean of the finite samples; in-window = inside the plotted square {WINDOW}.",
             "Blow-up step: the first traced step (every recipe.trace_every) whose batch denoising error is "
             f"over {BLOWUP_FACTOR:g} times the reference's, or not finite."]
    return render_markdown("2-D utility-function experiment (paper §6, Fig. 6)", info,
                           {f"Results at beta = {beta:g}": headline, "Beta grid": grid},
                           {"Samples": "utility2d.png"}, notes)


def run(out_dir: str | Path, recipe: Recipe2D | None = None, command: str = "utility2d.run") -> dict:
    """Pretrain, fine-tune with every method and the beta grid, and write utility2d.png, .json and .md."""
    recipe = recipe or Recipe2D()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = pretrain(recipe)
    panels = {"pretrained": sample(base, recipe)}
    results: dict = {"pretrained": summarise(panels["pretrained"])}
    panels["sft"], results["sft"] = evaluate(base, "sft", recipe, beta=None)
    beta = recipe.beta if recipe.beta is not None else beta_from_sft(results["sft"]["trace"], recipe.beta_grid)
    grid = {b: {u: evaluate(base, u, recipe, b) for u in UTILITIES} for b in sorted({*recipe.beta_grid, beta})}
    for u in UTILITIES:
        panels[u], results[u] = grid[beta][u]
    panels = {name: panels[name] for name in ("pretrained", *METHODS)}
    results.update(_beta=beta, _beta_source="given" if recipe.beta is not None else "beta_from_sft",
                   _grid={b: {u: res for u, (_, res) in by_u.items()} for b, by_u in grid.items()},
                   _seconds=round(time.perf_counter() - start, 1), _recipe=recipe.__dict__, _commit=commit())
    scatter(panels).save(out / "utility2d.png")
    (out / "utility2d.json").write_text(json.dumps(jsonable(results), indent=1))
    (out / "utility2d.md").write_text(markdown(results, command))
    return results
