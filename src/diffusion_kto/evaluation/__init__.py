"""Evaluation: the paper's median-of-N win rates with 95% CIs (§5, App. B) and self-contained reports."""
from ..images import image_grid
from .report import score_histograms, write_report
from .winrate import (
    Comparison,
    MeanScore,
    Table,
    WinRate,
    compare,
    mean_score,
    mean_scores,
    means_table,
    median_index,
    median_scores,
    normal_ci,
    proportion,
    win_rate,
    wilson_interval,
    winrate_table,
)

__all__ = [
    "Comparison", "MeanScore", "Table", "WinRate", "compare", "image_grid", "mean_score", "mean_scores",
    "means_table", "median_index", "median_scores", "normal_ci", "proportion", "score_histograms", "win_rate",
    "wilson_interval", "winrate_table", "write_report",
]
