"""`dkto demo` with a judge it cannot use: one line naming the judge, exit code 2, and nothing trained."""
import os
import subprocess
import sys

import pytest

BAD = '''
import numpy as np

def short(images, prompts):
    return np.zeros(len(images) - 1)

def nan(images, prompts):
    scores = np.full(len(images), 0.5)
    scores[3] = np.nan
    return scores
'''


def _demo(tmp_path, judge: str):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "diffusion_kto.cli", "demo", "--out", str(out), "--judge", judge,
                           "--budget", "8", "--groups", "1", "--guard-checks", "0", "train.max_steps=1"],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc, out


@pytest.mark.parametrize("judge, message", [
    ("{bad}:short", "returned 7 scores for 8 images"),
    ("{bad}:nan", "1 non-finite scores (NaN or inf), the first for image 3"),
    ("nope.module:thing", "cannot load judge 'nope.module:thing'"),
    ("toy:nosuch", "provider 'toy' has no judge 'nosuch'"),
])
def test_a_judge_the_demo_cannot_use_stops_it_before_training(tmp_path, judge, message):
    bad = tmp_path / "bad.py"
    bad.write_text(BAD)
    proc, out = _demo(tmp_path, judge.format(bad=bad))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dkto demo: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert not (out / "model").exists()  # no training happened
