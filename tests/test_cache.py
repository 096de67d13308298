"""`dkto cache` and data.cache: round trip, cached == uncached training, stale caches refused, the CLI."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tiny import tiny_overrides
from diffusion_kto.config import load_config
from diffusion_kto.data import read_feedback
from diffusion_kto.data.cache import CacheError, LatentCache, image_hash
from diffusion_kto.data.transforms import DrawChoices, transform_image
from diffusion_kto.data.feedback import load_image
from diffusion_kto.models import load_family
from diffusion_kto.train import DiffusionKTOTrainer
from diffusion_kto.train.precompute import build_cache

# cached and uncached runs differ only in how the encoders batch their work (all images of the cache at once, or
# the B images of a step); on CPU in fp32 that changes the last bits of the O(1) latents and embeddings
# (LATENT_ATOL, seen up to 1.2e-6 with several threads). The weights after 3 steps agree to ATOL (Adam's
# normalised steps barely see those bits); the losses see them through beta = 100 and the sigmoid's slope 1/4:
# LOSS_ATOL = 25 ATOL. On CUDA, convolutions run in TF32 by default (10-bit mantissa) and pick kernels by batch
# size: the weights were seen to differ by 2.9e-6 (H200), so ATOL is 1e-5 there.
LATENT_ATOL = 1e-5
ATOL = 1e-5 if torch.cuda.is_available() else 1e-6
LOSS_ATOL = 25 * ATOL


def _cfg(pipe, data, out, **extra):
    base = {"lora.rank": 4, "data.random_flip": True, "data.caption_dropout": 0.5, "train.max_steps": 3}
    return load_config(None, tiny_overrides(pipe, data, out, **{**base, **extra}))


@pytest.fixture
def cache_dir(tiny_sd, feedback, tmp_path):
    """A latents + text cache of the 8-row tiny feedback at 16 px, both flips, shards of 3 images."""
    build_cache(_cfg(tiny_sd, feedback, tmp_path / "unused"), tmp_path / "cache", shard_size=3, batch_size=2,
                progress=None)
    return tmp_path / "cache"


def test_round_trip_latents_and_text(tiny_sd, feedback, cache_dir):
    cache = LatentCache(cache_dir)
    cfg = _cfg(tiny_sd, feedback, cache_dir / "unused")
    family = load_family(cfg, weight_dtype=torch.float32, device="cpu", with_reference=False)
    rows = read_feedback(str(feedback))
    assert len(cache.latent_shards) == 3 and cache.key.flips == (False, True) and cache.has_text
    for row in rows[:4]:
        key = image_hash(row)
        for flip in (False, True):
            pixels = transform_image(load_image(row), 16, DrawChoices(0.5, 0.5, flip, False), center_crop=True,
                                     random_flip=True)
            mean, std = family.latent_moments(pixels[None])
            got_mean, got_std = cache.latents(key, flip)
            assert got_mean.shape == (4, 8, 8) and got_std.shape == (4, 8, 8)
            torch.testing.assert_close(got_mean, mean[0], atol=LATENT_ATOL, rtol=0)
            torch.testing.assert_close(got_std, std[0], atol=LATENT_ATOL, rtol=0)
    prompts = [rows[0].prompt, "", rows[1].prompt]
    torch.testing.assert_close(cache.text(prompts)["hidden_states"], family.encode_prompts(prompts).hidden_states,
                               atol=LATENT_ATOL, rtol=0)
    shard = load_file(str(cache_dir / "latents-00000.safetensors"))
    assert shard["mean"].shape == (3, 2, 4, 8, 8) and shard["std"].dtype == torch.float32


@pytest.mark.parametrize("reference_point", ["mismatched", "matched"])
def test_cached_training_equals_uncached(tiny_sd, feedback, cache_dir, tmp_path, reference_point):
    """Same draws, same losses, same weights: the cache replaces the encoders and nothing else."""
    runs = {}
    for name, extra in (("plain", {}), ("cached", {"data.cache": str(cache_dir)})):
        trainer = DiffusionKTOTrainer(_cfg(tiny_sd, feedback, tmp_path / name, **{
            "loss.reference_point": reference_point, **extra}))
        trainer.train()
        runs[name] = trainer
    assert runs["plain"].family.vae is not None
    assert runs["cached"].family.vae is None and runs["cached"].family.text_encoder is None  # never loaded
    a = load_file(str(tmp_path / "plain" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "cached" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=0)
    la = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in la] == pytest.approx([x["loss"] for x in lb], abs=LOSS_ATOL)
    assert [x["kl"] for x in la] == pytest.approx([x["kl"] for x in lb], abs=ATOL)
    summary = json.loads((tmp_path / "cached" / "summary.json").read_text())
    assert summary["cached_latents"] and summary["cached_text"] and summary["data_wait_seconds"] >= 0


def test_latents_only_cache_keeps_the_text_encoder(tiny_sd, feedback, tmp_path):
    build_cache(_cfg(tiny_sd, feedback, tmp_path / "unused"), tmp_path / "cache", text=False, progress=None)
    trainer = DiffusionKTOTrainer(_cfg(tiny_sd, feedback, tmp_path / "run", **{"data.cache": str(tmp_path / "cache"),
                                                                                "train.max_steps": 1}))
    assert trainer.family.vae is None and trainer.family.text_encoder is not None
    assert trainer.train().steps == 1


def _refused(cfg, *needles):
    with pytest.raises(CacheError) as err:
        DiffusionKTOTrainer(cfg)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_stale_resolution_and_flips_are_refused(tiny_sd, feedback, cache_dir, tmp_path):
    manifest = str(cache_dir / "manifest.json")
    _refused(_cfg(tiny_sd, feedback, tmp_path / "a", **{"data.cache": str(cache_dir), "data.resolution": 8}),
             manifest, "'resolution'", "stale")
    build_cache(_cfg(tiny_sd, feedback, tmp_path / "u", **{"data.random_flip": False}), tmp_path / "noflip",
                progress=None)
    _refused(_cfg(tiny_sd, feedback, tmp_path / "b", **{"data.cache": str(tmp_path / "noflip")}),
             str(tmp_path / "noflip" / "manifest.json"), "'flips'")


def test_stale_model_is_refused(tiny_sd, feedback, cache_dir, tmp_path):
    other = tmp_path / "other_pipe"
    shutil.copytree(tiny_sd, other)
    config = other / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "scaling_factor": 0.5}))
    _refused(_cfg(other, feedback, tmp_path / "run", **{"data.cache": str(cache_dir)}),
             str(cache_dir / "manifest.json"), "'vae'", str(tiny_sd))


def test_changed_image_is_refused_naming_the_row(tiny_sd, feedback, cache_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (16, 16), (1, 2, 3)).save(feedback.parent / "img2.png")
    _refused(_cfg(tiny_sd, feedback, tmp_path / "run", **{"data.cache": str(cache_dir)}),
             "feedback.jsonl:3", "img2.png", str(cache_dir / "manifest.json"))


def test_missing_manifest_is_refused(tiny_sd, feedback, tmp_path):
    (tmp_path / "empty").mkdir()
    _refused(_cfg(tiny_sd, feedback, tmp_path / "run", **{"data.cache": str(tmp_path / "empty")}),
             str(tmp_path / "empty" / "manifest.json"), "dkto cache")


def test_dkto_cache_cli(tiny_sd, feedback, tmp_path):
    args = [sys.executable, "-m", "diffusion_kto.cli", "cache", "--out", str(tmp_path / "c"),
            *tiny_overrides(tiny_sd, feedback, tmp_path / "run")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "data.cache=" in done.stdout
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["key"]["resolution"] == 16 and len(manifest["images"]) == 8 and "" not in manifest["prompts"]
    again = subprocess.run(args, capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "--overwrite" in again.stderr
