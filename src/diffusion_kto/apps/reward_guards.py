"""Guards against reward hacking: an aligned model must keep the prompted content and the variety of the base.

A judge that scores one trait (say, red images) can be pleased by drawing that trait whatever the prompt asks: the
win rate under that judge rises while the model stops following prompts. So every aligned model is also measured
on two things the judge does not reward: prompt fidelity (on the shapes world the ``fidelity`` judge: prompted
colour x shape x background; on real models a CLIP score) and diversity (mean pairwise distance between images of one
prompt). A model whose fidelity falls below ``share`` x the base's, or whose diversity falls below ``diversity_share`` x
the base's, fails its guard: the loop rolls that round back, the demo says that its aligned model is not to be used.

Why diversity has its own, lower share: on the shapes world the base draws flawed images (grain, off-centre shapes,
stray clutter) that the feedback trains away, and those flaws are part of its pixel diversity. Every useful aligned
model loses some: the tuned demo keeps 72% of the base's, KTO in `dkto bench align` 79%, and in the demo sweep only a
20-step run kept more than 80% (benchmarks/results/demo-sweep.md). A 90% diversity guard would refuse them all; 60%
still catches the collapse of Diffusion-DPO on the same labels (55% in bench align, 48% in a quick bench)."""
from __future__ import annotations

GUARDED = ("fidelity", "diversity")
DEFAULT_SHARE = 0.9  # of the base's prompt fidelity
DEFAULT_DIVERSITY_SHARE = 0.6  # of the base's diversity (see above)


def guard_verdict(base: dict, model: dict, share: float = DEFAULT_SHARE,
                  diversity_share: float = DEFAULT_DIVERSITY_SHARE) -> dict:
    """{"passed", "failed": [names], "ratios": {name: model / base}, "lines": [one line per guard]} for the
    ``fidelity`` (against ``share``) and ``diversity`` (against ``diversity_share``) of ``model`` against ``base``."""
    shares = {"fidelity": share, "diversity": diversity_share}
    ratios = {k: model[k] / base[k] if base[k] > 0 else float("inf") for k in GUARDED}
    failed = [k for k in GUARDED if ratios[k] < shares[k]]
    lines = [f"{k}: {model[k]:.4g} vs base {base[k]:.4g} ({ratios[k]:.0%} of base; guard {shares[k]:.0%}) "
             + ("FAILED" if k in failed else "ok") for k in GUARDED]
    return {"passed": not failed, "failed": failed, "shares": shares,
            "ratios": {k: round(v, 4) for k, v in ratios.items()}, "lines": lines}
