"""Image categories from pairwise comparisons, and the policies that turn categories into like/dislike labels.

Diffusion-KTO (arXiv 2404.04465 §5) turns Pick-a-Pic v2's pairwise choices into per-image labels: "an image
preferred at least once is desirable", 237,530 liked and 690,538 disliked images. The official code reads the
result as a CSV (`file_name`, `caption`, `split` ∈ exclusive_win / exclusive_lose / intersections) and picks the
labels with `--policy`; it ships no conversion script. Here every comparison an image took part in is tallied
(wins, losses, ties) and the image falls into one category:

* ``win``: won at least once, never lost (official ``exclusive_win``)
* ``intermediate``: won at least once and lost at least once (official ``intersections``)
* ``lose``: lost at least once, never won (official ``exclusive_lose``)
* ``tie_only``: only ties counted (no wins, no losses); never labelled

Ties (label_0 = label_1 = 0.5) follow ``ties``: ``neither`` (default; a tie is neither a win nor a loss),
``win`` (a tie counts as a win for both images) or ``lose`` (a loss for both). Policies map categories to labels:

* ``win_intermediate`` (default; official ``gt_label_wi_l``): liked = win + intermediate, disliked = lose
* ``win_only`` (official ``gt_label_w_l``): liked = win, disliked = lose, intermediate dropped
* ``win_vs_rest`` (official ``gt_label_w_il``): liked = win, disliked = intermediate + lose

``tie_only`` images are dropped under every policy. How the paper counted ties is not stated (see docs/data.md).
"""
from __future__ import annotations

from .rows import FeedbackError

CATEGORIES = ("win", "intermediate", "lose", "tie_only")
POLICIES = {  # category -> liked (True) / disliked (False); absent = dropped
    "win_intermediate": {"win": True, "intermediate": True, "lose": False},
    "win_only": {"win": True, "lose": False},
    "win_vs_rest": {"win": True, "intermediate": False, "lose": False},
}
OFFICIAL_POLICIES = {"gt_label_wi_l": "win_intermediate", "gt_label_w_l": "win_only", "gt_label_w_il": "win_vs_rest"}
TIE_RULES = ("neither", "win", "lose")


def resolve_policy(policy: str) -> str:
    """The canonical policy name; the official script's names (gt_label_wi_l, ...) are accepted too."""
    name = OFFICIAL_POLICIES.get(policy, policy)
    if name not in POLICIES:
        choices = ", ".join([*POLICIES, *OFFICIAL_POLICIES])
        raise FeedbackError(f"unknown policy {policy!r}; choose one of {choices}")
    return name


def check_ties(ties: str) -> str:
    """`ties` itself when it is a known tie rule (neither / win / lose)."""
    if ties not in TIE_RULES:
        raise FeedbackError(f"unknown tie rule {ties!r}; choose one of {', '.join(TIE_RULES)}")
    return ties


def categorize(wins: int, losses: int, ties: int = 0, tie_rule: str = "neither") -> str:
    """The category (win / intermediate / lose / tie_only) of an image from its comparison counts."""
    if tie_rule == "win":
        wins += ties
    elif tie_rule == "lose":
        losses += ties
    if wins and losses:
        return "intermediate"
    if wins:
        return "win"
    if losses:
        return "lose"
    return "tie_only"


def policy_label(category: str, policy: str = "win_intermediate") -> bool | None:
    """Liked (True), disliked (False) or dropped (None) for an image category under a policy."""
    return POLICIES[resolve_policy(policy)].get(category)
