"""Guards against reward hacking: an aligned model must keep the prompted content and the variety of the base.

A judge that scores one trait (say, red images) can be pleased by drawing that trait whatever the prompt asks: the
win rate under that judge rises while the model stops following prompts. So every aligned model is also measured
on two things the judge does not reward: prompt fidelity (on the shapes world the ``fidelity`` judge: prompted
colour x shape x background; on real models a CLIP score) and diversity (mean pairwise distance between images of one
prompt). A model whose fidelity or diversity falls below ``share`` x the base's fails its guard: the loop rolls that
round back, the demo says that its aligned model is not to be used."""
from __future__ import annotations

GUARDED = ("fidelity", "diversity")
DEFAULT_SHARE = 0.9  # of the base's fidelity and diversity


def guard_verdict(base: dict, model: dict, share: float = DEFAULT_SHARE) -> dict:
    """{"passed", "failed": [names], "ratios": {name: model / base}, "lines": [one line per guard]} for the
    ``fidelity`` and ``diversity`` of ``model`` against ``base`` (dicts holding those keys)."""
    ratios = {k: model[k] / base[k] if base[k] > 0 else float("inf") for k in GUARDED}
    failed = [k for k in GUARDED if ratios[k] < share]
    lines = [f"{k}: {model[k]:.4g} vs base {base[k]:.4g} ({ratios[k]:.0%} of base; guard {share:.0%}) "
             + ("FAILED" if k in failed else "ok") for k in GUARDED]
    return {"passed": not failed, "failed": failed, "share": share,
            "ratios": {k: round(v, 4) for k, v in ratios.items()}, "lines": lines}
