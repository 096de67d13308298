"""Guards against reward hacking: an aligned model must keep the prompted content and the variety of the base.

A judge that scores one trait (say, red images) can be pleased by drawing that trait whatever the prompt asks: the
win rate under that judge rises while the model stops following prompts. So every aligned model is also measured
on two things the judge does not reward: prompt fidelity (on the shapes world the ``fidelity`` judge: prompted
colour x shape x background; on real models a CLIP score) and diversity (mean pairwise distance between images of one
prompt). A model whose fidelity falls below ``share`` x the base's, or whose diversity falls below ``diversity_share`` x
the base's, fails its guard: the loop rolls that round back, the demo rolls its run back to the newest checkpoint
that passes (:mod:`.guard_rollback`).

The shares: 90% of the base's fidelity and 75% of its diversity (issue 23's floor). Diversity's is lower because on
the shapes world the base draws flawed images (grain, off-centre shapes, stray clutter) that the feedback trains away,
and those flaws are part of its pixel diversity: every useful aligned model loses some (KTO in `dkto bench align`
kept 79%, Diffusion-DPO on the same labels 55%)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

GUARDED = ("fidelity", "diversity")
DEFAULT_SHARE = 0.9  # of the base's prompt fidelity
DEFAULT_DIVERSITY_SHARE = 0.75  # of the base's diversity (see above)


def diversity(images: Sequence, n: int) -> float:
    """Mean pairwise RMS pixel distance between images of the same prompt and seed group (higher = more diverse)."""
    x = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])  # (M, H, W, 3)
    x = x.reshape(-1, n, *x.shape[1:]).reshape(-1, n, int(np.prod(x.shape[1:])))  # (groups, n, D)
    d = np.sqrt(((x[:, :, None, :] - x[:, None, :, :]) ** 2).mean(-1))  # (groups, n, n)
    iu = np.triu_indices(n, k=1)
    return float(d[:, iu[0], iu[1]].mean())


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
