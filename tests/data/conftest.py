"""Fixtures for the feedback data tests: tiny PNGs and feedback files written to tmp_path."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image


def png_bytes(color=(200, 30, 30), size=(8, 6), mode="RGB") -> bytes:
    """A tiny solid-colour image encoded as PNG."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_jsonl(path: Path, records) -> Path:
    """Write dicts (or raw strings) as JSON lines."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(name="png_bytes")
def png_bytes_fixture():
    """The png_bytes helper, as a fixture (test modules must not import conftest: several exist)."""
    return png_bytes


@pytest.fixture(name="write_jsonl")
def write_jsonl_fixture():
    """The write_jsonl helper, as a fixture."""
    return write_jsonl


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """Three PNG files in tmp_path/img: red, green, blue."""
    folder = tmp_path / "img"
    folder.mkdir()
    paths = []
    for name, color in (("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))):
        path = folder / f"{name}.png"
        path.write_bytes(png_bytes(color))
        paths.append(path)
    return paths


@pytest.fixture
def records() -> list[dict]:
    """Three feedback records pointing at the `images` fixture, relative to tmp_path."""
    return [
        {"image": "img/red.png", "prompt": "a red square", "label": "like"},
        {"image": "img/green.png", "prompt": "a green square", "label": "dislike"},
        {"image": "img/blue.png", "prompt": "a blue square", "label": 1},
    ]
