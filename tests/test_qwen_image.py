"""Qwen-Image: its text features are QwenImagePipeline's own (template dropped, cut to the batch's longest), its
latents normalised per channel as the pipeline decodes them, its shift the pipeline's mu."""
import math

import torch

from tiny import tiny_overrides
from diffusion_kto.config import load_config
from diffusion_kto.models import load_family


def _family(folder, data, out):
    cfg = load_config(None, tiny_overrides(folder, data, out, **{"lora.rank": 2}))
    return load_family(cfg, weight_dtype=torch.float32, device="cpu")


def test_encode_prompts_equals_the_pipelines_encode_prompt(tiny_qwen_image, feedback, tmp_path):
    from diffusers import QwenImagePipeline

    fam = _family(tiny_qwen_image, feedback, tmp_path / "r")
    prompts = ["a red circle", "a blue square on gray"]
    cond = fam.encode_prompts(prompts)
    embeds, mask = QwenImagePipeline.from_pretrained(tiny_qwen_image).encode_prompt(prompts, device="cpu")
    longest = mask.shape[1]
    assert cond.prompt_mask.sum(1).tolist() == mask.sum(1).tolist() and int(cond.prompt_mask.sum(1).max()) == longest
    torch.testing.assert_close(cond.prompt_embeds[:, :longest], embeds, rtol=0, atol=1e-6)
    assert not cond.prompt_embeds[:, longest:].any()


def test_latents_are_normalised_per_channel_as_the_pipeline_decodes_them(tiny_qwen_image, feedback, tmp_path):
    """The pipeline decodes z = x0 * latents_std + latents_mean; x0 here is (z - mean) / std of the posterior draw."""
    fam = _family(tiny_qwen_image, feedback, tmp_path / "r")
    mean, std = torch.randn(2, 4, 8, 8), torch.rand(2, 4, 8, 8)
    eps = torch.randn(2, 4, 8, 8)
    x0 = fam.sample_latents(mean, std, lambda shape: eps)
    vae = fam.vae.config
    z = x0 * torch.tensor(vae.latents_std).view(1, 4, 1, 1) + torch.tensor(vae.latents_mean).view(1, 4, 1, 1)
    torch.testing.assert_close(z, mean + std * eps)
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    m, s = fam.latent_moments(pixels)
    assert m.shape == s.shape == (1, 4, 8, 8)  # the video VAE's one frame, squeezed


def test_sigma_shift_is_the_pipelines_mu(tiny_qwen_image, feedback, tmp_path):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    fam = _family(tiny_qwen_image, feedback, tmp_path / "r")
    config = fam.scheduler.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    assert fam.vae_factor == 2 and math.isclose(fam.sigma_shift(), math.exp(mu), rel_tol=1e-12)
