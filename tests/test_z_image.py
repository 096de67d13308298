"""Z-Image: its caption features are ZImagePipeline's own, its prediction the velocity the pipeline steps with, its
shift the scheduler's, and its kohya names the ones diffusers' Z-Image loader reads."""
import torch

from tiny import tiny_overrides
from diffusion_kto.config import load_config
from diffusion_kto.models import load_family


def _family(folder, data, out):
    cfg = load_config(None, tiny_overrides(folder, data, out, **{"lora.rank": 2}))
    return load_family(cfg, weight_dtype=torch.float32, device="cpu")


def test_encode_prompts_equals_the_pipelines_caption_features(tiny_z_image, feedback, tmp_path):
    from diffusers import ZImagePipeline

    fam = _family(tiny_z_image, feedback, tmp_path / "r")
    prompts = ["a red circle", "a blue square on gray"]
    cond = fam.encode_prompts(prompts)
    pipe = ZImagePipeline.from_pretrained(tiny_z_image)
    expected = pipe._encode_prompt(list(prompts), device="cpu", max_sequence_length=fam.tokens)
    for embeds, mask, want in zip(cond.prompt_embeds, cond.prompt_mask, expected):
        torch.testing.assert_close(embeds[mask], want, rtol=0, atol=1e-6)
        assert not embeds[~mask].any()
    assert cond.prompt_mask.sum(1).tolist()[0] < cond.prompt_mask.sum(1).tolist()[1]  # lengths differ per prompt


def test_prediction_is_the_negated_output_at_time_one_minus_sigma(tiny_z_image, feedback, tmp_path):
    """The pipeline steps with noise_pred = -transformer(x, (1000 - t) / 1000, captions), i.e. v = eps - x0."""
    fam = _family(tiny_z_image, feedback, tmp_path / "r")
    cond = fam.encode_prompts(["a red circle"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.7])
    net = fam.trainable_module()
    with torch.no_grad():
        out = net([x[0].unsqueeze(1)], torch.tensor([0.3]), [cond.prompt_embeds[0][cond.prompt_mask[0]]],
                  return_dict=False)[0][0]
        torch.testing.assert_close(fam.predict(x, sigma, cond), -out.squeeze(1)[None], rtol=0, atol=1e-6)


def test_fixed_scheduler_shift_and_kohya_names(tiny_z_image, feedback, tmp_path):
    from diffusion_kto.models import lora_formats

    fam = _family(tiny_z_image, feedback, tmp_path / "r")
    assert fam.sigma_shift() == 3.0  # Z-Image's scheduler shifts by a fixed 3 (no dynamic shifting)
    source = fam.lora_source(2.0, dict(fam.transformer_config))
    kohya = lora_formats.to_kohya(fam.trainable_state(), source)
    assert "lora_unet_layers_0_attention_to_q.lora_down.weight" in kohya
