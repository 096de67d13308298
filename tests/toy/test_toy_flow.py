"""The flow-matching toy (toy-flow): its recipe, a few-step pretraining that writes a loadable SD3 pipeline, and the
shipped weights (small, safetensors, the prompted colours, loaded as a family)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion_kto.toy import flow_model, flow_pretrain, flow_weights_dir, judges, world


def test_t5_tokenizer_gives_one_piece_per_word():
    tokenizer = flow_model.build_t5_tokenizer()
    for prompt in world.all_prompts():
        ids = tokenizer(prompt).input_ids
        assert tokenizer.convert_ids_to_tokens(ids[:-1]) == ["\u2581" + w for w in prompt.split()], prompt
        assert ids[-1] == tokenizer.eos_token_id and len(ids) <= flow_model.TOKENS


def test_tiny_flow_pretrain_writes_a_loadable_sd3_pipeline_around_the_sd_toys_vae(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    from diffusion_kto.toy import weights_dir

    out = flow_pretrain.pretrain(tmp_path / "pipe", seed=1, steps=2, batch_size=4, corpus_size=16, progress=False)
    info = json.loads((out / "pretrain.json").read_text())
    assert info["recipe"]["steps"] == 2 and set(info["seconds"]) == {"corpus", "encode", "transformer", "total"}
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    sd_vae = AutoencoderKL.from_pretrained(weights_dir(), subfolder="vae")
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), sd_vae.state_dict().values()))
    assert pipe.vae.config.shift_factor != 0 and pipe.vae.config.scaling_factor > 0
    image = pipe("a red circle", height=32, width=32, num_inference_steps=2, max_sequence_length=flow_model.TOKENS,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


@pytest.fixture(scope="module")
def shipped():
    if not (flow_weights_dir() / "model_index.json").exists():
        pytest.skip("toy-flow weights not shipped in this checkout")
    return flow_weights_dir()


def test_shipped_flow_weights_are_small_safetensors_in_sd3_layout(shipped):
    files = [p for p in shipped.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".ckpt"}]
    index = json.loads((shipped / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"][1] == "T5EncoderModel"


def test_shipped_flow_model_draws_the_prompted_colour_through_the_project(shipped):
    from diffusion_kto.sampling import generate, load_pipeline

    prompts = [world.train_prompts()[i] for i in range(0, 45, 3)]
    images = generate(load_pipeline("toy-flow", device="cpu"), prompts, list(range(len(prompts))), steps=8,
                      guidance=3.0, resolution=32)
    colour = judges.colour_score(images, prompts)
    assert np.mean(colour >= 0.5) >= 0.6, colour
