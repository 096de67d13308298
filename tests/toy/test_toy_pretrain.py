"""Toy pretraining: a few-step run writes a loadable diffusers pipeline with its recipe and timings."""
from __future__ import annotations

import json

import pytest
import torch

from diffusion_kto.toy import pretrain as toy_pretrain


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [toy_pretrain.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_corpus_pixels_are_in_vae_range():
    pixels, prompts = toy_pretrain.corpus_pixels(8, seed=0, flaw_rate=0.5)
    assert pixels.shape == (8, 3, 32, 32) and len(prompts) == 8
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_tiny_pretrain_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = toy_pretrain.pretrain(tmp_path / "pipe", seed=1, vae_steps=2, unet_steps=2, batch_size=4,
                                corpus_size=32, progress=False)
    info = json.loads((out / "pretrain.json").read_text())
    assert info["recipe"]["seed"] == 1 and info["recipe"]["unet_steps"] == 2
    assert set(info["seconds"]) == {"corpus", "vae", "encode", "unet", "total"}
    assert (out / "tokenizer" / "vocab.json").exists() and (out / "tokenizer" / "merges.txt").exists()
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor > 0 and pipe.vae.config.scaling_factor != 1.0
    with torch.no_grad():
        image = pipe("a red circle", height=32, width=32, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
