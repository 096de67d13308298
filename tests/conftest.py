"""Shared fixtures: tiny Stable Diffusion pipelines and feedback datasets (helpers live in tests/tiny.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import build_tiny_sd, build_tiny_sdxl, write_feedback  # noqa: E402
from tiny_flow import (build_tiny_chroma, build_tiny_flux, build_tiny_qwen_image, build_tiny_sd3,  # noqa: E402
                       build_tiny_z_image)
from tiny_flux2 import build_tiny_flux2, build_tiny_flux2_klein  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction SD pipeline folder."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    """A tiny v-prediction SD pipeline folder (SD 2.x style)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny epsilon-prediction SDXL pipeline folder."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A tiny SD3 pipeline folder (two CLIP encoders and T5)."""
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A tiny FLUX.1 [dev]-like pipeline folder (CLIP, T5, a guidance embedding)."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture
def feedback(tmp_path) -> Path:
    """A JSONL feedback file of 8 rows, 4 liked and 4 disliked."""
    return write_feedback(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_chroma(tmp_path_factory) -> Path:
    """A tiny Chroma pipeline folder (T5 only, no guidance embedding)."""
    return build_tiny_chroma(tmp_path_factory.mktemp("tiny_chroma"))


@pytest.fixture(scope="session")
def tiny_z_image(tmp_path_factory) -> Path:
    """A tiny Z-Image pipeline folder (Qwen3 text encoder, single-stream DiT)."""
    return build_tiny_z_image(tmp_path_factory.mktemp("tiny_z_image"))


@pytest.fixture(scope="session")
def tiny_qwen_image(tmp_path_factory) -> Path:
    """A tiny Qwen-Image pipeline folder (Qwen2.5-VL text encoder, video VAE)."""
    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen_image"))


@pytest.fixture(scope="session")
def tiny_flux2(tmp_path_factory) -> Path:
    """A tiny FLUX.2 [dev] pipeline folder (Mistral3 text encoder, guidance embedding)."""
    return build_tiny_flux2(tmp_path_factory.mktemp("tiny_flux2"))


@pytest.fixture(scope="session")
def tiny_flux2_klein(tmp_path_factory) -> Path:
    """A tiny step-distilled FLUX.2 [klein] pipeline folder (Qwen3 text encoder, no guidance embedding)."""
    return build_tiny_flux2_klein(tmp_path_factory.mktemp("tiny_flux2_klein"))
