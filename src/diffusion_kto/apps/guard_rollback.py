"""Guards that act: a run that traded prompt fidelity or diversity for its judge's approval is rolled back.

After training, the guard walks the chord θ_0 + α (θ_T − θ_0) from the start (the base) to the final weights, a
weight-space ensemble of the two (WiSE-FT), and keeps the largest α whose model keeps ``share`` of the base's prompt
fidelity and ``diversity_share`` of its diversity (:mod:`.reward_guards`) on a guard set of images: the final weights
first, then bisection. The kept weights are exported in place of the final ones (the final weights stay in their
checkpoint); α = 0 is the base. With ``search="checkpoints"`` it checks the run's checkpoints (every 1/``checks`` of
its steps) newest first instead and keeps the newest that passes. On six demo runs the chord's choice won more over the
base than the checkpoint's for the same training, at the same guards (benchmarks/results/guards.md). Fidelity and
diversity do not depend on the judge, so the guard works for judges the project has never seen.

The guard set is 15 of the training prompts (every third) x ``groups`` seed groups x ``images`` images, with seeds
of its own: the held-out prompts of the evaluation never steer the choice. A guard set is one draw of images, so a
checkpoint passes on fidelity only when the lower confidence bound of its fidelity keeps ``share`` of the base's:
mean - z se of the per-image differences from the base's images of the same prompts and seeds (paired), z = 1.64
(one-sided 95%). Without the bound, the reddest judge's run at 61906d1 kept a checkpoint at 102% of the base's
fidelity on 90 guard images that held 86% on the evaluation's (benchmarks/results/guards.md)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..sampling import generate
from ..toy import judges, world
from ..train.checkpoint import PREFIX, list_checkpoints, load_checkpoint
from .reward_guards import DEFAULT_DIVERSITY_SHARE, DEFAULT_SHARE, diversity, guard_verdict

SEARCHES = ("chord", "checkpoints")  # what a rollback walks (GuardPlan.search)
GUARD_SEED = 30_000_000  # the guard images' seeds: disjoint from feedback (seed x 1e6 + i) and evaluation (1e7 + ...)


@dataclass(frozen=True)
class GuardPlan:
    """How a run is guarded: checkpoints checked, guard images, and the shares of the base's to keep."""

    checks: int = 8  # checkpoints a run is checked at (every max_steps / checks steps); 0: no rollback
    groups: int = 2  # seed groups per guard prompt
    images: int = 5  # images per seed group (diversity is measured within a group)
    share: float = DEFAULT_SHARE
    diversity_share: float = DEFAULT_DIVERSITY_SHARE
    z: float = 1.64  # the fidelity guard uses mean - z se (paired with the base's images); 0: the mean alone
    # "chord" (default): the largest passing α (search_chord); "checkpoints": the newest passing checkpoint. On six demo
    # trainings the chord's choice won 78.9% vs 71.5% over the base (benchmarks/results/guards.md)
    search: str = "chord"
    bisections: int = 4  # chord: α to 1/16

    def __post_init__(self):
        if self.search not in SEARCHES:
            raise ValueError(f"guard search {self.search!r}: choose one of {', '.join(SEARCHES)}")


def checkpoint_overrides(max_steps: int, checks: int) -> list[str]:
    """Config overrides that checkpoint a run ``checks`` times and keep every one (plus the final step's)."""
    if checks <= 0:
        return []
    return [f"train.checkpoint_every={max(1, max_steps // checks)}", f"train.keep_checkpoints={checks + 1}"]


def guard_set(seed: int, plan: GuardPlan) -> tuple[list[str], list[int]]:
    """The guard images' prompts and seeds, (15 x groups x images,) each, grouped by prompt then seed group."""
    prompts, seeds = [], []
    for p_idx, prompt in enumerate(world.train_prompts()[::3]):
        for k in range(plan.groups * plan.images):
            prompts.append(prompt)
            seeds.append(GUARD_SEED + seed * 100_000 + p_idx * plan.groups * plan.images + k)
    return prompts, seeds


def guard_stats(pipe, plan: GuardPlan, seed: int, sampling: dict) -> tuple[dict, np.ndarray]:
    """Prompt fidelity (the shapes world's fidelity judge) and diversity of one model's guard images, and the
    per-image fidelity scores (M,)."""
    prompts, seeds = guard_set(seed, plan)
    images = generate(pipe, prompts, seeds, batch_size=64, **sampling)
    scores = np.asarray(judges.fidelity(images, prompts), dtype=float)
    return {"fidelity": float(scores.mean()), "diversity": diversity(images, plan.images)}, scores


def fidelity_bound(scores: np.ndarray, base_scores: np.ndarray, z: float) -> float:
    """Lower bound of a model's mean fidelity: base mean + mean(d) - z sd(d) / sqrt(M), d = scores - base_scores
    (per image, same prompts and seeds)."""
    d = scores - base_scores  # (M,)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(base_scores.mean() + d.mean() - z * se)


def checkpoint_step(path: Path) -> int:
    """The step of a ``checkpoint-<step>`` folder."""
    return int(path.name[len(PREFIX):])


def check(family, weights: dict, label: dict, base: tuple[dict, np.ndarray], plan: GuardPlan, seed: int,
          sampling: dict) -> dict:
    """Load ``weights`` into the family and check them against both guards (fidelity by its lower bound): one entry
    of the report's ``checked``, ``label`` (its step, or its α) first."""
    (base_stats, base_scores) = base
    family.load_trainable_state(weights)
    with family.pipeline() as pipe:
        stats, scores = guard_stats(pipe, plan, seed, sampling)
    bound = {**stats, "fidelity": fidelity_bound(scores, base_scores, plan.z)}
    verdict = guard_verdict(base_stats, bound, plan.share, plan.diversity_share)
    return {**label, "passed": verdict["passed"], "ratios": verdict["ratios"],
            "fidelity_mean": round(stats["fidelity"], 4),
            "lines": [line.replace("fidelity:", "fidelity (lower bound):", 1) for line in verdict["lines"]]}


def check_newest_first(trainer, base: tuple[dict, np.ndarray], plan: GuardPlan, seed: int,
                       sampling: dict) -> tuple[int, list[dict]]:
    """Check each checkpoint of the run, newest first, until one passes both guards: (its step or 0, the checks)."""
    checked = []
    for path in reversed(list_checkpoints(Path(trainer.out) / "checkpoints")):
        step = checkpoint_step(path)
        checked.append(check(trainer.family, load_checkpoint(path)["weights"], {"step": step}, base, plan, seed,
                             sampling))
        if checked[-1]["passed"]:
            return step, checked
    return 0, checked


def chord(initial: dict[str, Tensor], final: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """θ_α = θ_0 + α (θ_T − θ_0) for every floating trainable tensor (WiSE-FT's weight-space ensemble, Wortsman et
    al. 2022, Eq. 1); other tensors keep the final value. For LoRA θ_0 has B = 0, so ΔW(α) = α B_T (A_0 + α (A_T −
    A_0)): 0 at α = 0, the trained ΔW at 1."""
    return {k: torch.lerp(initial[k].to(v.dtype), v, alpha) if v.is_floating_point() else v for k, v in final.items()}


def search_chord(family, initial: dict, final: dict, base: tuple[dict, np.ndarray], plan: GuardPlan, seed: int,
                 sampling: dict) -> tuple[float, list[dict]]:
    """The largest α on the chord from the start to the final weights that passes both guards, to 1 / 2^bisections
    (the final weights first; then bisection, which assumes one crossing): (α, the checks). ``initial`` and ``final``
    must be copies: each check loads weights into the family's parameters."""
    checked = [check(family, final, {"alpha": 1.0}, base, plan, seed, sampling)]
    if checked[-1]["passed"]:
        return 1.0, checked
    lo, hi = 0.0, 1.0
    for _ in range(plan.bisections):
        mid = (lo + hi) / 2
        checked.append(check(family, chord(initial, final, mid), {"alpha": mid}, base, plan, seed, sampling))
        lo, hi = (mid, hi) if checked[-1]["passed"] else (lo, mid)
    return lo, checked


def rollback(trainer, base_pipe, initial: dict, plan: GuardPlan, seed: int, sampling: dict, final_step: int) -> dict:
    """Keep what passes the guards (plan.search: the newest checkpoint, or the largest α on the chord to the final
    weights; else the start, ``initial``), export it in place of the final weights when it is not them, and say what
    was done."""
    base = guard_stats(base_pipe, plan, seed, sampling)
    alpha = None
    if plan.search == "chord":
        final = {k: v.clone() for k, v in trainer.family.trainable_state().items()}  # on CPU it aliases the params
        alpha, checked = search_chord(trainer.family, initial, final, base, plan, seed, sampling)
        chosen = final_step if alpha > 0 else 0
        trainer.family.load_trainable_state(chord(initial, final, alpha))
    else:
        chosen, checked = check_newest_first(trainer, base, plan, seed, sampling)  # leaves the chosen one loaded
        if chosen == 0:
            trainer.family.load_trainable_state(initial)
    kept = chosen == final_step and alpha in (None, 1.0)
    if not kept:
        trainer.family.export(str(trainer.out))
    return {"chosen_step": chosen, "alpha": alpha, "final_step": final_step, "rolled_back": not kept, "base": base[0],
            "checked": checked, "shares": [plan.share, plan.diversity_share],
            "line": rollback_line(kept, chosen, alpha, final_step)}


def rollback_line(kept: bool, chosen: int, alpha: float | None, final_step: int) -> str:
    """One line for the report: what the guards kept (``kept``: the final weights)."""
    if kept:
        return f"guards passed at the final step {final_step}: the trained model is kept"
    if chosen and alpha is not None:
        return (f"stopped by the guards: kept alpha = {alpha:g} of the way from the base to step {final_step} "
                "(theta_0 + alpha (theta_T - theta_0)), the largest that keeps the base's prompt fidelity and diversity")
    if chosen:
        return (f"stopped by the guards: rolled back from step {final_step} to step {chosen}, the newest checkpoint "
                "that keeps the base's prompt fidelity and diversity")
    what = "point between the base and the final weights" if alpha is not None else "checkpoint"
    return (f"stopped by the guards: no {what} keeps the base's prompt fidelity and diversity; rolled back to "
            "step 0, the base model")
