"""The paper's win-rate protocol (§5, App. B) against hand-computed values."""
import math

import numpy as np
import pytest

from diffusion_kto.evaluation.winrate import (
    Table,
    compare,
    default_pairs,
    mean_score,
    mean_scores,
    means_table,
    median_index,
    median_scores,
    normal_ci,
    proportion,
    summary,
    wilson_interval,
    win_rate,
    winrate_table,
)


def test_median_of_five_is_the_middle_image():
    scores = np.array([[1.0, 5.0, 3.0, 2.0, 4.0], [9.0, 0.0, 7.0, 8.0, 1.0]])
    assert median_scores(scores).tolist() == [3.0, 7.0]
    assert median_index(scores).tolist() == [2, 2]


def test_median_of_even_n_is_the_upper_middle_image():
    scores = np.array([[1.0, 4.0, 2.0, 3.0]])
    assert median_scores(scores).tolist() == [3.0]  # not numpy's 2.5: the median must be a real image
    assert median_index(scores).tolist() == [3]


def test_median_index_is_stable_on_ties_and_1d_means_one_image():
    assert median_index([[2.0, 2.0, 2.0]]).tolist() == [1]
    assert median_scores([0.5, 0.7]).tolist() == [0.5, 0.7]


def test_win_rate_hand_computed_with_ties_as_half():
    a = [[1, 2, 3], [5, 5, 5], [0, 0, 9], [2, 2, 2]]  # medians 2, 5, 0, 2
    b = [[0, 1, 2], [4, 5, 6], [1, 1, 1], [3, 3, 3]]  # medians 1, 5, 1, 3
    r = win_rate(a, b)
    assert (r.wins, r.ties, r.losses, r.n) == (1, 1, 2, 4)
    assert r.rate == pytest.approx((1 + 0.5) / 4)
    assert r.ci == pytest.approx(1.96 * math.sqrt(0.375 * 0.625 / 4), abs=1e-4)


def test_win_rate_uses_medians_not_means():
    a = [[0.0, 0.0, 100.0]]  # mean 33.3, median 0
    b = [[1.0, 1.0, 1.0]]  # mean 1, median 1
    assert win_rate(a, b).rate == 0.0


def test_all_ties_give_one_half_and_rates_are_complementary():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    assert win_rate(a, a).rate == 0.5
    assert win_rate(a, b).rate + win_rate(b, a).rate == pytest.approx(1.0)


def test_paper_interval_86_at_2500():
    assert 100 * normal_ci(0.86, 2500) == pytest.approx(1.36, abs=0.005)
    r = proportion(2150, 0, 2500)
    assert r.rate == pytest.approx(0.86)
    assert r.cell() == "86.0 ± 1.4"
    assert r.cell(digits=2) == "86.00 ± 1.36"


@pytest.mark.parametrize("p, half", [(0.620, 1.90), (0.966, 0.71), (0.506, 1.96), (0.872, 1.31)])
def test_paper_table_intervals(p, half):
    assert 100 * normal_ci(p, 2500) == pytest.approx(half, abs=0.005)


def test_ci_n_images_reproduces_the_paper_and_prompts_is_default():
    a = np.ones((500, 5))
    b = np.zeros((500, 5))
    b[:70] = 2.0  # B wins 70 of 500 prompts, A wins 430 -> 86%
    by_prompts, by_images = win_rate(a, b), win_rate(a, b, ci_n="images")
    assert by_prompts.rate == by_images.rate == pytest.approx(0.86)
    assert (by_prompts.ci_n, by_images.ci_n) == (500, 2500)
    assert by_images.cell() == "86.0 ± 1.4"
    assert by_prompts.cell() == "86.0 ± 3.0"


def test_wilson_interval_hand_computed():
    assert wilson_interval(0.5, 100) == pytest.approx((0.40383, 0.59617), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.27754), abs=1e-4)
    r = proportion(0, 0, 10, ci="wilson")
    assert (r.low, r.high) == pytest.approx((0.0, 0.27754), abs=1e-4)
    assert r.cell() == "0.0 [0.0, 27.8]"


def test_lower_is_better_flips_the_winner():
    a, b = [[1.0]], [[2.0]]
    assert win_rate(a, b).rate == 0.0
    assert win_rate(a, b, higher_is_better=False).rate == 1.0
    comps = compare({"A": {"flaws": a}, "B": {"flaws": b}}, lower_is_better=["flaws"])
    assert comps[0].result.rate == 1.0


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="same prompts"):
        win_rate(np.zeros((3, 5)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        win_rate([[np.nan]], [[1.0]])
    with pytest.raises(ValueError, match="ci must be"):
        win_rate([[1.0]], [[1.0]], ci="exact")
    with pytest.raises(ValueError, match="same number of images"):
        win_rate(np.zeros((3, 5)), np.zeros((3, 4)), ci_n="images")


def test_mean_score_hand_computed():
    m = mean_score([[1.0, 2.0], [3.0, 4.0]])
    assert (m.mean, m.n) == (2.5, 4)
    assert m.std == pytest.approx(math.sqrt(5 / 3))
    assert m.ci == pytest.approx(1.96 * math.sqrt(5 / 3) / 2, abs=1e-4)
    assert m.cell() == "2.500 ± 1.265"
    assert math.isnan(mean_score([[1.0]]).ci)


def test_default_pairs():
    assert default_pairs(["K", "S", "D"]) == [("K", "S"), ("K", "D"), ("S", "D")]
    assert default_pairs(["K", "S", "D"], focus="S") == [("S", "K"), ("S", "D")]
    with pytest.raises(ValueError):
        default_pairs(["K"], focus="X")


def test_winrate_table_has_the_shape_of_table_1():
    one, zero = np.ones((10, 5)), np.zeros((10, 5))
    scores = {
        "KTO": {"aesthetic": one, "pickscore": one},
        "SD": {"aesthetic": zero, "pickscore": one},
        "DPO": {"aesthetic": zero},
    }
    table = winrate_table(compare(scores, focus="KTO"))
    assert table.header == ["comparison", "aesthetic", "pickscore"]
    assert table.rows[0] == ["KTO vs SD", "100.0 ± 0.0", "50.0 ± 31.0"]
    assert table.rows[1] == ["KTO vs DPO", "100.0 ± 0.0", "—"]
    assert "ties count half" in table.caption and "n = 10 prompts" in table.caption
    md = table.to_markdown().splitlines()
    assert md[0] == "| comparison | aesthetic | pickscore |" and md[1] == "|---|---|---|"


def test_means_table_and_summary():
    scores = {"A": {"m": [[1.0, 2.0], [3.0, 4.0]]}, "B": {"m": [[0.0, 0.0], [0.0, 0.0]]}}
    means = mean_scores(scores)
    table = means_table(means)
    assert table.rows == [["A", "2.500 ± 1.265"], ["B", "0.000 ± 0.000"]]
    out = summary(compare(scores), means)
    assert out["winrates"][0] | {"ci": None} == {
        "a": "A", "b": "B", "metric": "m", "wins": 2, "ties": 0, "losses": 0, "n": 2, "rate": 1.0,
        "ci": None, "low": 1.0, "high": 1.0, "ci_method": "normal", "ci_n": 2}
    assert out["means"]["A"]["m"]["mean"] == 2.5


def test_markdown_escapes_pipes():
    assert "a\\|b" in Table(["x"], [["a|b"]]).to_markdown()
