"""Chroma: its text conditioning is ChromaPipeline's own, its mask hand-derived, its shift the pipeline's mu."""
import math

import torch

from tiny import tiny_overrides
from diffusion_kto.config import load_config
from diffusion_kto.models import load_family
from diffusion_kto.models.chroma import text_mask


def _family(folder, data, out):
    cfg = load_config(None, tiny_overrides(folder, data, out, **{"lora.rank": 2}))
    return load_family(cfg, weight_dtype=torch.float32, device="cpu")


def test_text_mask_keeps_the_prompt_and_its_first_padding_token():
    tokenizer_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert text_mask(tokenizer_mask).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_encode_prompts_equals_the_pipelines_encode_prompt(tiny_chroma, feedback, tmp_path):
    from diffusers import ChromaPipeline

    fam = _family(tiny_chroma, feedback, tmp_path / "r")
    prompts = ["a red circle", "a blue square on gray"]
    cond = fam.encode_prompts(prompts)
    pipe = ChromaPipeline.from_pretrained(tiny_chroma)
    embeds, _, mask, *_ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                             max_sequence_length=fam.t5_tokens)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=1e-6)
    assert torch.equal(cond.attention_mask, mask.float())
    assert cond.mismatched().attention_mask[0].tolist() == cond.attention_mask[1].tolist()  # the mask moves with it


def test_sigma_shift_is_the_pipelines_mu(tiny_chroma, feedback, tmp_path):
    from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

    fam = _family(tiny_chroma, feedback, tmp_path / "r")
    tokens = (16 // fam.vae_factor // 2) ** 2  # 16 px, VAE factor 2, 2x2 packing: 4 x 4 image tokens
    assert math.isclose(fam.sigma_shift(), math.exp(calculate_shift(tokens)), rel_tol=1e-12)
