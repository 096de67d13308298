"""Reports: results JSON, report.md and the self-contained report.html."""
import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from diffusion_kto.evaluation import report
from diffusion_kto.evaluation.report import write_report
from diffusion_kto.evaluation.winrate import compare, mean_scores
from diffusion_kto.images import image_grid
from test_images import _tiles


def _scores():
    rng = np.random.default_rng(1)
    return {
        "Diffusion-KTO": {"aesthetic": rng.normal(1.0, 1, (20, 5)), "pickscore": rng.normal(0.5, 1, (20, 5))},
        "SD v1-5": {"aesthetic": rng.normal(0.0, 1, (20, 5)), "pickscore": rng.normal(0.0, 1, (20, 5))},
    }


@pytest.fixture
def written(tmp_path):
    scores = _scores()
    grid = image_grid({"Diffusion-KTO": _tiles(3), "SD v1-5": _tiles(3, seed=1)}, ["red cube", "seed 1", "s2"])
    paths = write_report(
        tmp_path / "out", title="Toy <demo> report",
        run_info={"command": "dkto demo --steps 10", "commit": "abc123", "wall_time_s": {"train": 1.5}},
        winrates=compare(scores, focus="Diffusion-KTO"), means=mean_scores(scores),
        extra_tables={"prompt fidelity": {"Diffusion-KTO": 0.9, "SD v1-5": 0.7},
                      "diversity": {"Diffusion-KTO": {"lpips": 0.31, "colors": 4}}},
        grids={"seeds": grid}, scores=scores,
    )
    return paths, grid


def test_written_files(written):
    paths, _ = written
    for key in ("results", "markdown", "html", "grid_seeds"):
        assert paths[key].is_file(), key
    assert paths["results"].name == "results.json"


def test_results_json_is_strict_json(written):
    paths, _ = written

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    data = json.loads(paths["results"].read_text(), parse_constant=no_nan)
    assert data["title"] == "Toy <demo> report"
    assert data["run_info"]["wall_time_s"]["train"] == 1.5
    assert {w["metric"] for w in data["winrates"]} == {"aesthetic", "pickscore"}
    assert set(data["means"]) == {"Diffusion-KTO", "SD v1-5"}


def test_caller_results_are_written_as_given(tmp_path):
    payload = {"x": np.float32(1.5), "arr": np.arange(3), "bad": float("nan")}
    paths = write_report(tmp_path, title="t", results=payload, results_name="metrics.json")
    assert json.loads(paths["results"].read_text()) == {"x": 1.5, "arr": [0, 1, 2], "bad": None}
    assert paths["results"].name == "metrics.json"


def test_markdown_contains_tables_and_run_info(written):
    paths, _ = written
    md = paths["markdown"].read_text(encoding="utf-8")
    assert md.startswith("# Toy <demo> report")
    assert "| comparison | aesthetic | pickscore |" in md
    assert re.search(r"\| Diffusion-KTO vs SD v1-5 \| \d+\.\d ± \d+\.\d \| \d+\.\d ± \d+\.\d \|", md)
    assert re.search(r"\| SD v1-5 \| -?\d+\.\d{3} ± \d+\.\d{3} \|", md)
    assert "**wall_time_s.train**: `1.5`" in md and "`dkto demo --steps 10`" in md
    assert "## prompt fidelity" in md and "| Diffusion-KTO | 0.9 |" in md
    assert "|  | lpips | colors |" in md
    assert "![Image grid: seeds](grid_seeds.png)" in md


class _Checker(HTMLParser):
    """Collects img sources and external references, and checks tags are balanced."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.srcs, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


def test_html_is_self_contained_with_embedded_pngs(written):
    paths, grid = written
    text = paths["html"].read_text(encoding="utf-8")
    assert "<title>Toy &lt;demo&gt; report</title>" in text
    assert '<img alt="Image grid: seeds"' in text and 'src="data:image/png;base64,' in text
    assert "<th>comparison</th><th>aesthetic</th><th>pickscore</th>" in text
    assert "<td>Diffusion-KTO vs SD v1-5</td>" in text and "<dd><code>dkto demo --steps 10</code></dd>" in text
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.stack == [] and checker.external == []
    assert "<script" not in text and "<link" not in text and "@import" not in text
    first = Image.open(io.BytesIO(base64.b64decode(checker.srcs[0].split(",", 1)[1])))
    assert first.size == grid.size


def test_histograms_when_matplotlib_is_installed(written):
    pytest.importorskip("matplotlib", reason="matplotlib ([eval] extra) not installed")
    paths, _ = written
    assert paths["hist_aesthetic"].is_file() and paths["hist_pickscore"].is_file()
    assert Image.open(paths["hist_aesthetic"]).size[0] > 100
    assert "Score histogram: aesthetic" in paths["html"].read_text(encoding="utf-8")


def test_histograms_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "matplotlib_available", lambda: False)
    paths = write_report(tmp_path, title="t", scores=_scores())
    assert not any(k.startswith("hist_") for k in paths)
    assert "matplotlib is not installed" in paths["markdown"].read_text(encoding="utf-8")
    assert "matplotlib is not installed" in paths["html"].read_text(encoding="utf-8")


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "headless_shell"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if found:
            return found
    return None


def test_html_renders_in_headless_chromium(written, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary found (chromium, chromium-browser, google-chrome): "
                    "install it to check that report.html renders")
    paths, _ = written
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=1200,1600", f"--screenshot={shot}", paths["html"].resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"no screenshot; chromium said: {proc.stderr[-2000:]}"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "screenshot is (nearly) blank"
    assert (pixels < 128).any(), "no dark pixels: text did not render"
