"""dkto bench regimes: each regime's transformation checked by hand, the one-line refusals, and the CLI end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_kto.apps.bench_regimes import REGIMES, RegimeSettings, cannot_run, few_liked, flip, one_per_prompt
from diffusion_kto.config import ConfigError


def feedback(n_prompts: int = 5, per_prompt: int = 8, liked_every: int = 3) -> list[dict]:
    """n_prompts x per_prompt rows; every third row of a prompt liked."""
    return [{"image": f"images/{p}-{k}.png", "prompt": f"prompt {p}", "label": k % liked_every == 0, "score": 0.5}
            for p in range(n_prompts) for k in range(per_prompt)]


def test_flip_turns_exactly_the_asked_share_and_keeps_every_row():
    rows = feedback()  # 40 rows
    out = flip(rows, np.random.default_rng(0), 0.15)
    assert len(out) == 40 and [r["image"] for r in out] == [r["image"] for r in rows]
    assert sum(a["label"] != b["label"] for a, b in zip(rows, out)) == 6  # round(0.15 * 40)
    assert sum(a["label"] != b["label"] for a, b in zip(rows, flip(rows, np.random.default_rng(0), 0.30))) == 12


def test_one_per_prompt_keeps_one_row_of_each_prompt():
    out = one_per_prompt(feedback(), np.random.default_rng(1))
    assert [r["prompt"] for r in out] == [f"prompt {p}" for p in range(5)]
    assert all(r in feedback() for r in out)


def test_few_liked_keeps_every_disliked_row_and_makes_liked_ten_percent():
    rows = feedback(n_prompts=10, per_prompt=10)  # 100 rows: 40 liked (k = 0, 3, 6, 9), 60 disliked
    out = few_liked(rows, np.random.default_rng(2))
    assert sum(not r["label"] for r in out) == 60 and sum(r["label"] for r in out) == 7  # round(0.1 / 0.9 * 60)
    with pytest.raises(ConfigError, match="cannot be 10%"):
        few_liked([r for r in rows if not r["label"]][:50] + rows[:1], np.random.default_rng(0))


def test_likes_only_drops_the_disliked_rows_and_nothing_else():
    rows = feedback()
    out = REGIMES["e"](rows, np.random.default_rng(0))
    assert out == [r for r in rows if r["label"]]


def test_dpo_says_in_one_line_why_it_cannot_run_without_pairs():
    rows = feedback()
    assert cannot_run("dpo", rows) is None  # both labels on every prompt
    for regime in ("b", "e"):
        kept = REGIMES[regime](rows, np.random.default_rng(0))
        if regime == "b":  # one image per prompt: no prompt can hold both labels
            assert len({r["prompt"] for r in kept}) == len(kept)
        assert cannot_run("dpo", kept).startswith("dpo: cannot run, no prompt has both")
        assert cannot_run("kto", kept) is None
    assert cannot_run("sft", [r for r in rows if not r["label"]]) == "sft: cannot run, no liked image"


def test_unknown_regimes_and_methods_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="unknown regime z; choose from a, b"):
        RegimeSettings(regimes=("a", "z"))
    with pytest.raises(ConfigError, match="unknown method ppo"):
        RegimeSettings(methods=("ppo",))
    assert RegimeSettings(quick=True).seeds == 1 and RegimeSettings().seeds == 3


@pytest.mark.slow
def test_the_cli_runs_two_regimes_and_writes_the_table_and_the_plot(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffusion_kto.cli", "bench", "regimes", "--quick", "--regimes", "a,e",
           "--methods", "kto,bco,sft,dpo", "--budget", "64", "--steps", "2", "--out", str(tmp_path / "r")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "e: dpo: cannot run, no prompt has both" in done.stdout
    summary = json.loads((tmp_path / "r" / "regimes.json").read_text())
    assert {(r["regime"], r["method"]) for r in summary["rows"]} == {
        ("a", "kto"), ("a", "bco"), ("a", "sft"), ("a", "dpo"), ("e", "kto"), ("e", "sft")}  # KTO at gamma 1 on likes
    assert "e: bco: cannot run" in done.stdout and "no disliked rows" in done.stdout
    md = (tmp_path / "r" / "regimes.md").read_text()
    assert "likes only" in md and "dpo: cannot run" in md and (tmp_path / "r" / "frontier.png").stat().st_size > 0


def test_tuning_trials_scale_each_methods_own_knob_and_the_lr():
    """--tune: kto's beta 2000 at 1, 1/8, 1/32 at lr 4e-5 plus lr 2e-5 / 8e-5 at 2000; nft tunes nft_beta, not
    loss.beta; sft (no knob) the lr grid; without --tune one trial, lr 4e-5 at the config, in the old folder."""
    from diffusion_kto.apps.bench_regimes import describe, trials

    assert [describe(t) for t in trials("kto", True)] == [
        "loss.beta=2000 optim.lr=4e-05", "loss.beta=250 optim.lr=4e-05", "loss.beta=62.5 optim.lr=4e-05",
        "loss.beta=2000 optim.lr=2e-05", "loss.beta=2000 optim.lr=8e-05"]
    assert {t[1][0] for t in trials("nft", True)} == {"loss.nft_beta=1", "loss.nft_beta=0.5", "loss.nft_beta=0.25"}
    assert [describe(t) for t in trials("sft", True)] == ["optim.lr=2e-05", "optim.lr=4e-05", "optim.lr=8e-05"]
    assert trials("kto", False) == [(4e-5, (), "")] and trials("dpo", False) == [(4e-5, (), "")]
    assert len({t[2] + str(t[0]) for t in trials("bco", True)}) == 5  # every trial trains into a folder of its own
