"""Tiny random-weight scorer models built from configs and saved to temp folders, all offline."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def build_tiny_clip(folder: Path, tokenizer_dir: Path) -> Path:
    """A CLIPModel with tiny text and vision towers plus a CLIPProcessor (32 px), saved with save_pretrained."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def aesthetic_state_dict(dim: int, seed: int = 0) -> dict:
    """A random state dict in the published improved-aesthetic-predictor layout (layers.{0,2,4,6,7})."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    module = nn.Module()
    module.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                  nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    return module.state_dict()


@pytest.fixture(scope="session")
def tiny_clip(tiny_sd, tmp_path_factory) -> Path:
    """A saved tiny CLIP model + processor folder (serves pickscore, clip and the aesthetic backbone)."""
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip", tiny_sd / "tokenizer")


@pytest.fixture(scope="session")
def aesthetic_dir(tiny_clip, tmp_path_factory) -> Path:
    """A folder with the tiny CLIP backbone and an aesthetic head file, as users lay out a download."""
    import torch

    folder = tmp_path_factory.mktemp("aesthetic") / "aesthetic"
    shutil.copytree(tiny_clip, folder)
    torch.save(aesthetic_state_dict(8), folder / "sac+logos+ava1-l14-linearMSE.pth")
    return folder


@pytest.fixture
def images():
    """Six random 16x16 images."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(6)]


@pytest.fixture
def prompts():
    """Six prompts in the tiny tokenizer's vocabulary (and the toy grammar)."""
    return ["a red circle", "a blue square", "a green circle", "a red square", "a blue circle", "a green square"]
