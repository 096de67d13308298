"""`dkto loop` end to end with tiny budgets: two rounds with a fast judge, killed mid-way and resumed without redoing
finished stages; people labelling through the API (slow); the guards' verdict."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from label_helpers import free_port, request
from test_cli import dkto

from diffusion_kto.apps.reward_guards import guard_verdict

TINY = ["--rounds", "2", "--per-round", "8", "--groups", "1", "--images-per-prompt", "3",
        "train.batch_size=4", "train.max_steps=2"]
KEYS = {"round", "labels", "liked_share", "win_rate", "mean_score", "fidelity", "fidelity_base", "diversity",
        "diversity_base", "guard_passed", "action"}


def _popen(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "diffusion_kto.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(path, proc, seconds=600):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_two_rounds_killed_after_a_stage_resume_without_redoing_it(tmp_path):
    out = tmp_path / "loop"
    args = ["loop", "--judge", "preference", "--out", str(out), *TINY]
    proc = _popen(*args)
    marker = out / "round-001" / "done" / "train.json"
    _wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in [out / "base" / "done.json", *(out / "round-001" / "done").iterdir()]}
    assert {p.name for p in done} >= {"done.json", "generate.json", "label.json", "train.json"}

    again = dkto(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("evaluate the base", "round 1: generate", "round 1: label", "round 1: train"):
        assert f"[loop] {stage}: done earlier, kept" in again.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished stages were not redone
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(KEYS <= set(r) for r in rows)
    assert all(0 <= r["win_rate"] <= 1 and r["labels"] == 8 for r in rows)
    if rows[0]["guard_passed"]:  # round 2 trains from round 1's weights, with the base as reference
        assert rows[1]["trained_from"].endswith("round-001/model")
    assert (out / "report.html").is_file() and (out / "rounds.png").is_file()
    # the labels went through the labeling store: one judge event per image
    assert len((out / "round-001" / "feedback.jsonl").read_text().splitlines()) == 8
    changed = dkto("loop", "--judge", "fidelity", "--out", str(out), *TINY)
    assert changed.returncode == 2 and "judge differ" in changed.stderr


@pytest.mark.slow
def test_human_loop_waits_for_people_and_trains_on_their_labels(tmp_path):
    out, port = tmp_path / "loop", free_port()
    proc = _popen("loop", "--human", "--port", str(port), "--out", str(out), "--rounds", "1", "--per-round", "6",
                  "--groups", "1", "--images-per-prompt", "3", "train.batch_size=4", "train.max_steps=2")
    _wait_for(out / "round-001" / "queue" / "labels.sqlite", proc)
    base = f"http://127.0.0.1:{port}"
    labelled = 0
    while labelled < 6:  # a person stands in through the API
        try:
            status, item = request(base, "/api/next?rater=pat")
        except OSError:
            time.sleep(0.5)
            continue
        if status == 204:
            break
        assert request(base, "/api/label", {"id": item["id"], "rater": "pat",
                                            "label": "like" if labelled % 2 else "dislike"})[0] == 200
        labelled += 1
    assert proc.wait(timeout=900) == 0, proc.stdout.read()[-3000:]
    row = json.loads((out / "rounds.jsonl").read_text())
    assert row["labels"] == 6 and row["liked_share"] == 0.5


def test_guard_verdict_hand_values():
    base = {"fidelity": 0.6, "diversity": 0.16}
    ok = guard_verdict(base, {"fidelity": 0.66, "diversity": 0.15})  # 110%, 93.75%
    assert ok["passed"] and ok["ratios"] == {"fidelity": 1.1, "diversity": 0.9375}
    hacked = guard_verdict(base, {"fidelity": 0.40, "diversity": 0.15})  # the demo's one-trait judge: 0.61 -> 0.40
    assert not hacked["passed"] and hacked["failed"] == ["fidelity"] and "FAILED" in hacked["lines"][0]
    assert guard_verdict(base, {"fidelity": 0.55, "diversity": 0.12}, diversity_share=0.75)["passed"]  # 92%, 75%
    assert guard_verdict(base, {"fidelity": 0.53, "diversity": 0.12}, diversity_share=0.8)["failed"] == [
        "fidelity", "diversity"]  # 88% < 90%, 75% < 80%
    collapsed = guard_verdict(base, {"fidelity": 0.7, "diversity": 0.08})  # DPO-like: 50% of the base's diversity
    assert collapsed["failed"] == ["diversity"] and collapsed["shares"] == {"fidelity": 0.9, "diversity": 0.75}
