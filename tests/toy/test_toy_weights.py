"""The shipped toy pipeline: tokenizer covers the grammar, loads offline with diffusers, draws prompted colours."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion_kto.toy import judges, model, weights_dir, world


def test_tokenizer_gives_one_token_per_word_and_no_unknowns():
    tokenizer = model.build_tokenizer()
    for prompt in world.all_prompts() + ["a red circle on white"]:
        ids = tokenizer(prompt).input_ids
        words = tokenizer.convert_ids_to_tokens(ids[1:-1])
        assert words == [w + "</w>" for w in prompt.split()], prompt
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(tokenizer(world.all_prompts()[-1]).input_ids) <= model.MAX_TOKENS


def test_bpe_merges_never_resplit_earlier_words():
    words = ["green", "red", "re", "greenery", "e"]
    ranks = {pair: i for i, pair in enumerate(model.bpe_merges(words))}
    assert all(model._bpe(w, ranks) == [w + "</w>"] for w in words)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    folder = weights_dir()
    if not (folder / "model_index.json").exists():
        pytest.skip("toy weights not shipped in this checkout")
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_shipped_weights_are_small_safetensors_in_diffusers_layout(pipe):
    folder = weights_dir()
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".ckpt"}]
    index = json.loads((folder / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.scaling_factor != 1.0


def test_shipped_pipeline_draws_the_prompted_colour(pipe):
    torch.manual_seed(0)
    prompts = [world.train_prompts()[i] for i in range(0, 45, 3)][:16]
    prompts += [world.train_prompts()[1]] * (16 - len(prompts))
    with torch.no_grad():
        images = pipe(prompts, height=32, width=32, num_inference_steps=8, guidance_scale=4.0,
                      generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (32, 32)
    colour = judges.colour_score(images, prompts)
    assert np.mean(colour >= 0.5) >= 0.6, colour


def test_shipped_pipeline_draws_the_prompted_shape(pipe):
    """The shapes judge's shape score (probability that the prompted-colour pixels form the prompted shape) is high
    for the prompted shape and low for another shape on the same images: the model draws shapes, not only colours."""
    prompts = world.train_prompts()
    chosen = [prompts[i] for i in range(0, len(prompts), 2)][:24]
    with torch.no_grad():
        images = pipe(chosen, height=32, width=32, num_inference_steps=8, guidance_scale=4.0,
                      generator=torch.Generator().manual_seed(0)).images
    prompted = judges.shape_score(images, chosen)

    def another_shape(prompt):
        shape = next(s for s in world.SHAPES if s in prompt.split())
        return prompt.replace(shape, world.SHAPES[(world.SHAPES.index(shape) + 1) % len(world.SHAPES)])

    other = judges.shape_score(images, [another_shape(p) for p in chosen])
    assert np.mean(prompted >= 0.5) >= 0.5, prompted
    assert prompted.mean() > other.mean() + 0.3, (prompted.mean(), other.mean())
