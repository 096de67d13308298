"""Win rates and mean scores, following the evaluation protocol of Diffusion-KTO (arXiv 2404.04465, §5, App. B).

Protocol (§5): every model generates N images per prompt (N = 5 in the paper), a reward model scores each
image, and for each prompt the model whose *median-scored image* scores higher wins that prompt. The win rate
of A over B is the share of prompts A wins. Tables 1, 3-5 give a 95% interval ``1.96·sqrt(p(1-p)/n)``;
Table 2 gives mean score ± 95% CI over all N·prompts images.

Choices the paper leaves open, fixed here:

* Even N: the median image is the *upper-middle* one (sorted index N // 2), so it is always a real image.
* Ties between two medians count as half a win for each side.
* The interval's n is the number of prompts by default (``ci_n="prompts"``: the prompts are the independent
  trials). The paper's ± values match n = number of images (2500 = 500 prompts × 5, e.g.
  86.0 ± 1.36); pass ``ci_n="images"`` to reproduce them. A Wilson interval is available with ``ci="wilson"``.
* Higher scores are better unless a metric is declared ``lower_is_better``.
* Mean-score CI: 1.96 · sample std (ddof = 1) / sqrt(number of images).

Pure numpy: no torch, no models.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile; the paper's "1.96"
CI_METHODS = ("normal", "wilson")
CI_NS = ("prompts", "images")


@dataclass(frozen=True)
class WinRate:
    """A's win rate over B on one metric: ties count half (§5), interval [low, high] at 95%."""

    wins: int
    ties: int
    losses: int
    n: int
    rate: float
    ci: float
    low: float
    high: float
    ci_method: str = "normal"
    ci_n: int = 0

    def cell(self, digits: int = 1) -> str:
        """The table cell in percent, as in the paper's Tables 1 and 3: '86.0 ± 1.4'."""
        if self.ci_method == "wilson":
            return f"{100 * self.rate:.{digits}f} [{100 * self.low:.{digits}f}, {100 * self.high:.{digits}f}]"
        return f"{100 * self.rate:.{digits}f} ± {100 * self.ci:.{digits}f}"


@dataclass(frozen=True)
class MeanScore:
    """Mean score over all images with a 95% normal interval, as in the paper's Table 2."""

    mean: float
    ci: float
    std: float
    n: int

    def cell(self, digits: int = 3) -> str:
        """The table cell: '5.281 ± 0.022'."""
        return f"{self.mean:.{digits}f} ± {self.ci:.{digits}f}"


@dataclass(frozen=True)
class Comparison:
    """One row-cell of a win-rate table: model a against model b on one metric (§5, Table 1)."""

    a: str
    b: str
    metric: str
    result: WinRate


@dataclass
class Table:
    """A small rendered table: a header and rows of strings, the first column being the row label."""

    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""

    def to_markdown(self) -> str:
        """GitHub-flavoured markdown, pipes escaped."""
        esc = [[str(c).replace("|", "\\|") for c in row] for row in [self.header, *self.rows]]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in esc[1:]]
        return "\n".join(lines)


def as_score_matrix(scores) -> np.ndarray:
    """Scores as a float (n_prompts, n_images_per_prompt) array; 1-D means one image per prompt."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"scores must be (n_prompts, n_images_per_prompt) and non-empty, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores contain NaN or infinite values")
    return arr


def median_index(scores) -> np.ndarray:
    """Per prompt, the index of the median-scored image (§5); upper-middle for even N, stable on ties."""
    arr = as_score_matrix(scores)
    order = np.argsort(arr, axis=1, kind="stable")
    return order[:, arr.shape[1] // 2]


def median_scores(scores) -> np.ndarray:
    """Per prompt, the score of the median-scored image (§5): the middle of N, upper-middle for even N."""
    arr = as_score_matrix(scores)
    return np.sort(arr, axis=1)[:, arr.shape[1] // 2]


def normal_ci(p: float, n: int, z: float = Z95) -> float:
    """Half-width of the normal-approximation binomial interval, z·sqrt(p(1-p)/n) (App. B, Tables 3-5)."""
    if n <= 0:
        raise ValueError("n must be positive")
    return z * math.sqrt(max(p * (1.0 - p), 0.0) / n)


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion p out of n; better than the normal one near 0 and 1."""
    if n <= 0:
        raise ValueError("n must be positive")
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(max(p * (1.0 - p), 0.0) / n + z2n / (4 * n)) / (1 + z2n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(wins: int, ties: int, n: int, *, ci: str = "normal", ci_n: int | None = None) -> WinRate:
    """A WinRate from counts: rate = (wins + ties/2) / n (§5), interval from ci_n trials (default n)."""
    if ci not in CI_METHODS:
        raise ValueError(f"ci must be one of {CI_METHODS}, got {ci!r}")
    if not 0 <= wins + ties <= n or min(wins, ties) < 0:
        raise ValueError(f"invalid counts wins={wins} ties={ties} n={n}")
    trials = n if ci_n is None else int(ci_n)
    rate = (wins + 0.5 * ties) / n
    if ci == "wilson":
        low, high = wilson_interval(rate, trials)
        half = (high - low) / 2
    else:
        half = normal_ci(rate, trials)
        low, high = max(0.0, rate - half), min(1.0, rate + half)
    return WinRate(int(wins), int(ties), int(n - wins - ties), int(n), float(rate), float(half),
                   float(low), float(high), ci, trials)


def win_rate(scores_a, scores_b, *, ci: str = "normal", ci_n: str = "prompts",
             higher_is_better: bool = True) -> WinRate:
    """Win rate of A over B: per prompt, compare the median-scored images; ties count half (§5)."""
    a, b = as_score_matrix(scores_a), as_score_matrix(scores_b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"A and B must be scored on the same prompts: {a.shape[0]} vs {b.shape[0]} prompts")
    if ci_n not in CI_NS:
        raise ValueError(f"ci_n must be one of {CI_NS}, got {ci_n!r}")
    if ci_n == "images" and a.shape[1] != b.shape[1]:
        raise ValueError("ci_n='images' needs the same number of images per prompt for A and B")
    ma, mb = median_scores(a), median_scores(b)
    if not higher_is_better:
        ma, mb = -ma, -mb
    wins, ties = int(np.sum(ma > mb)), int(np.sum(ma == mb))
    n = a.shape[0]
    trials = n * a.shape[1] if ci_n == "images" else n
    return proportion(wins, ties, n, ci=ci, ci_n=trials)


def mean_score(scores, z: float = Z95) -> MeanScore:
    """Mean over all images with half-width z·std/sqrt(n) (Table 2); ci is NaN for a single image."""
    flat = as_score_matrix(scores).ravel()
    n = flat.size
    std = float(np.std(flat, ddof=1)) if n > 1 else float("nan")
    return MeanScore(float(np.mean(flat)), z * std / math.sqrt(n), std, int(n))


def default_pairs(models: Sequence[str], focus: str | None = None) -> list[tuple[str, str]]:
    """(focus, other) for every other model as in Table 1, or every unordered pair in the given order."""
    if focus is not None:
        if focus not in models:
            raise ValueError(f"focus model {focus!r} is not among {list(models)}")
        return [(focus, m) for m in models if m != focus]
    return list(itertools.combinations(models, 2))


def compare(scores: Mapping[str, Mapping[str, object]], *, pairs: Iterable[tuple[str, str]] | None = None,
            focus: str | None = None, ci: str = "normal", ci_n: str = "prompts",
            lower_is_better: Iterable[str] = ()) -> list[Comparison]:
    """Pairwise median-of-N win rates for scores[model][metric] = (n_prompts, N) arrays (§5, Table 1)."""
    models = list(scores)
    pair_list = list(pairs) if pairs is not None else default_pairs(models, focus)
    lower = set(lower_is_better)
    out = []
    for a, b in pair_list:
        for metric in scores[a]:
            if metric not in scores[b]:
                continue
            res = win_rate(scores[a][metric], scores[b][metric], ci=ci, ci_n=ci_n,
                           higher_is_better=metric not in lower)
            out.append(Comparison(a, b, metric, res))
    return out


def mean_scores(scores: Mapping[str, Mapping[str, object]], z: float = Z95) -> dict[str, dict[str, MeanScore]]:
    """Mean ± 95% CI of every model on every metric (Table 2)."""
    return {model: {metric: mean_score(s, z) for metric, s in per.items()} for model, per in scores.items()}


def _ordered(items: Iterable[str]) -> list[str]:
    """Unique items in first-appearance order."""
    return list(dict.fromkeys(items))


def winrate_table(comparisons: Sequence[Comparison], digits: int = 1) -> Table:
    """Rows 'A vs B', columns metrics, cells '86.0 ± 1.4' in percent: the shape of Table 1."""
    rows = _ordered(f"{c.a} vs {c.b}" for c in comparisons)
    metrics = _ordered(c.metric for c in comparisons)
    cells = {(f"{c.a} vs {c.b}", c.metric): c.result.cell(digits) for c in comparisons}
    table = Table(["comparison", *metrics], caption=winrate_caption(comparisons))
    table.rows = [[r, *(cells.get((r, m), "—") for m in metrics)] for r in rows]
    return table


def winrate_caption(comparisons: Sequence[Comparison]) -> str:
    """A one-line description of how the win rates and their intervals were computed (§5, App. B)."""
    if not comparisons:
        return "No comparisons."
    first = comparisons[0].result
    per = "images" if first.ci_n != first.n else "prompts"
    kind = "Wilson interval [low, high]" if first.ci_method == "wilson" else "± normal-approximation half-width"
    return (f"Win rate (%) of the first model over the second: per prompt, the median-scored image of each "
            f"model is compared; ties count half. {first.n} prompts; 95% {kind} with n = {first.ci_n} {per}.")


def means_table(means: Mapping[str, Mapping[str, MeanScore]], digits: int = 3) -> Table:
    """Rows models, columns metrics, cells 'mean ± 95% CI': the shape of Table 2."""
    metrics = _ordered(m for per in means.values() for m in per)
    table = Table(["model", *metrics],
                  caption="Mean score ± 95% CI (1.96·std/√n over all images of each model).")
    table.rows = [[model, *(per[m].cell(digits) if m in per else "—" for m in metrics)]
                  for model, per in means.items()]
    return table


def summary(comparisons: Sequence[Comparison], means: Mapping[str, Mapping[str, MeanScore]]) -> dict:
    """A JSON-ready dict of every comparison and mean score."""
    return {
        "winrates": [{"a": c.a, "b": c.b, "metric": c.metric, **asdict(c.result)} for c in comparisons],
        "means": {model: {m: asdict(s) for m, s in per.items()} for model, per in means.items()},
    }
