"""FLUX.2 [dev] and [klein]: their text features, latents, position ids and shift are the pipelines' own; the kohya
(BFL) names load back through Flux2Pipeline; klein's flags and refusals."""
import math

import numpy as np
import pytest
import torch

from tiny import tiny_overrides
from diffusion_kto.config import ConfigError, load_config
from diffusion_kto.models import load_family
from diffusion_kto.models.flux2 import latent_ids, patchify, text_ids
from diffusion_kto.models.flux_kohya import FLUX2, bfl_name, to_bfl_kohya
from diffusion_kto.train import DiffusionKTOTrainer


def _cfg(folder, data, out, **extra):
    return load_config(None, tiny_overrides(folder, data, out, **{"lora.rank": 2, **extra}))


def _family(folder, data, out, **extra):
    return load_family(_cfg(folder, data, out, **extra), weight_dtype=torch.float32, device="cpu")


def _pipeline(folder):
    import diffusers

    return diffusers.DiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize("pipe", ["tiny_flux2", "tiny_flux2_klein"])
def test_encode_prompts_equals_the_pipelines_encode_prompt(pipe, feedback, tmp_path, request):
    folder = request.getfixturevalue(pipe)
    fam = _family(folder, feedback, tmp_path / "r")
    prompts = ["a red circle", "a blue square on gray"]
    embeds, ids = _pipeline(folder).encode_prompt(prompts, device="cpu", max_sequence_length=fam.tokens)
    cond = fam.encode_prompts(prompts)
    assert cond.prompt_embeds.shape == (2, fam.tokens, 3 * 16)  # three stacked layers of the width-16 LLM
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=1e-6)
    assert torch.equal(text_ids(fam.tokens, "cpu"), ids[0])


def test_latents_are_the_pipelines_patchified_batch_normalised_latents(tiny_flux2, feedback, tmp_path):
    """latent_moments' mean is what Flux2Pipeline encodes a reference image to (the posterior mode, 2x2 patches,
    minus the batch-norm mean over its std)."""
    from diffusers import Flux2Pipeline

    fam = _family(tiny_flux2, feedback, tmp_path / "r")
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = fam.latent_moments(pixels)
    pipe = _pipeline(tiny_flux2)
    torch.testing.assert_close(mean, pipe._encode_vae_image(pixels, None), rtol=0, atol=1e-5)
    assert mean.shape == std.shape == (2, 16, 4, 4) and (std > 0).all()
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(patchify(x), Flux2Pipeline._patchify_latents(x))
    assert patchify(x)[0, :4, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]  # channel 0's first 2x2 patch, row-major
    assert torch.equal(latent_ids(2, 3, "cpu"), Flux2Pipeline._prepare_latent_ids(torch.zeros(1, 1, 2, 3))[0])
    assert latent_ids(2, 3, "cpu")[4].tolist() == [0, 1, 1, 0]


def test_sigma_shift_is_the_pipelines_mu_at_50_steps(tiny_flux2, feedback, tmp_path):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    fam = _family(tiny_flux2, feedback, tmp_path / "r")
    tokens = (16 // fam.vae_factor // 2) ** 2  # 16 px, VAE factor 2, 2x2 patches: 4 x 4 tokens
    assert math.isclose(fam.sigma_shift(), math.exp(compute_empirical_mu(tokens, 50)), rel_tol=1e-12)
    assert _family(tiny_flux2, feedback, tmp_path / "s", **{"flow.shift": 2.0}).sigma_shift() == 2.0


def test_dev_guidance_and_klein_flags(tiny_flux2, tiny_flux2_klein, feedback, tmp_path):
    dev = _family(tiny_flux2, feedback, tmp_path / "d")
    assert dev.guidance and dev.guidance_scale == 4.0  # Flux2Pipeline's default
    assert _family(tiny_flux2, feedback, tmp_path / "g", **{"model.guidance_scale": 2.5}).guidance_scale == 2.5
    klein = _family(tiny_flux2_klein, feedback, tmp_path / "k")
    assert not klein.guidance and klein.distilled
    with klein.pipeline() as pipe:
        assert type(pipe).__name__ == "Flux2KleinPipeline" and pipe.config.is_distilled
    with pytest.raises(ConfigError, match=r"^model.guidance_scale: .* has no guidance embedding") as err:
        _family(tiny_flux2_klein, feedback, tmp_path / "x", **{"model.guidance_scale": 3.0})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("extra,needle", [({"data.resolution": 18}, "data.resolution: 18 is not a multiple of 4"),
                                          ({"model.drop_t5": True}, "model.drop_t5: applies to")])
def test_bad_settings_are_one_line(extra, needle, tiny_flux2, feedback, tmp_path):
    with pytest.raises(ConfigError) as err:
        _family(tiny_flux2, feedback, tmp_path / "r", **extra)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("pipe", ["tiny_flux2", "tiny_flux2_klein"])
def test_overlong_prompts_are_found(pipe, feedback, tmp_path, request):
    fam = _family(request.getfixturevalue(pipe), feedback, tmp_path / "r")
    long = " ".join(["red circle"] * 40)
    assert fam.overlong_prompts(["a red circle", long]) == [long]


def test_kohya_names_fuse_double_block_qkv_and_load_back_to_the_trained_image(tiny_flux2, feedback, tmp_path):
    """BFL FLUX.2 keys: a double block's image q, k, v LoRAs become one block-diagonal img_attn_qkv, a single
    block's fused linear1 keeps its own; diffusers' Flux2 kohya loader maps them back, to the trained image."""
    from diffusers import Flux2Pipeline
    from safetensors.torch import save_file

    from test_flow_families import _image

    targets = "[to_q, to_k, to_v, to_out.0, add_q_proj, to_add_out, ff.linear_in, to_qkv_mlp_proj, proj_out]"
    trainer = DiffusionKTOTrainer(_cfg(tiny_flux2, feedback, tmp_path / "run", **{
        "lora.rank": 4, "lora.alpha": 8, "optim.lr": 1e-2, "lora.target_modules": targets}))
    trainer.train()
    kohya = to_bfl_kohya(trainer.family.trainable_state(), 8.0, dict(trainer.family.transformer_config), FLUX2)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert kohya[qkv + ".lora_down.weight"].shape == (12, 16) and kohya[qkv + ".lora_up.weight"].shape == (48, 12)
    assert float(kohya[qkv + ".alpha"]) == 24.0 and float(kohya["lora_unet_single_blocks_0_linear1.alpha"]) == 8
    assert not kohya[qkv + ".lora_up.weight"][:16, 4:].any()  # block-diagonal: q's rows see only q's rank
    assert "lora_unet_final_layer_linear.lora_up.weight" in kohya
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    loaded = Flux2Pipeline.from_pretrained(tiny_flux2)
    loaded.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    with trainer.family.pipeline() as policy:
        np.testing.assert_allclose(_image(loaded), _image(policy), atol=1e-5)
    assert bfl_name("single_transformer_blocks.7.attn.to_qkv_mlp_proj", FLUX2) == (
        "lora_unet_single_blocks_7_linear1", None)
    assert bfl_name("transformer_blocks.2.attn.add_v_proj", FLUX2) == ("lora_unet_double_blocks_2_txt_attn_qkv", 2)
    with pytest.raises(ValueError, match="double_stream_modulation_img"):
        bfl_name("double_stream_modulation_img.linear", FLUX2)
