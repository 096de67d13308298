"""The family-agnostic denoising forward on a tiny real SD family: what each plan computes, per-draw randomness,
the family's conditioning objects, and per-sample weights as a flow-matching family would give them."""
import pytest
import torch

from diffusion_kto import forward
from diffusion_kto.config import load_config
from diffusion_kto.models import load_family
from diffusion_kto.models.base import Noised
from diffusion_kto.models.stable_diffusion import TextEmbeddings
from diffusion_kto.objectives import ForwardPlan
from tiny import tiny_overrides


@pytest.fixture(scope="module")
def family(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("fwd")
    cfg = load_config(None, tiny_overrides(tiny_sd, out / "none.jsonl", out / "run", **{"lora.rank": 2}))
    torch.manual_seed(0)
    return load_family(cfg, weight_dtype=torch.float32, device="cpu")


def _inputs(family, draws=(0, 1, 2, 3)):
    prompts = ["a red circle", "a blue square", "a green circle", "a red square"][: len(draws)]
    cond = family.encode_prompts(prompts)
    x0 = torch.randn(len(draws), 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return x0, cond, torch.tensor(draws)


def test_conditioning_is_a_batch_of_named_tensors():
    cond = TextEmbeddings(torch.arange(12.0).reshape(3, 2, 2))
    assert len(cond) == 3 and torch.equal(cond[:2].hidden_states, cond.hidden_states[:2])
    assert torch.equal(cond.mismatched().hidden_states[0], cond.hidden_states[2])  # rolled by one
    both = TextEmbeddings.cat([cond, cond[:1]])
    assert both.hidden_states.shape == (4, 2, 2)
    assert cond.to(dtype=torch.float16).hidden_states.dtype == torch.float16
    assert torch.equal(TextEmbeddings.from_tensors(cond.tensors()).hidden_states, cond.hidden_states)


def test_each_plan_computes_what_it_asks(family):
    x0, cond, draws = _inputs(family)
    policy_only = forward.denoising_errors(family, x0, cond, draws, 0, ForwardPlan())
    assert policy_only.policy.shape == (4,) and policy_only.reference is None and policy_only.policy.requires_grad
    errors = forward.denoising_errors(family, x0, cond, draws, 0, ForwardPlan(reference=True, mismatched=2))
    assert errors.reference.shape == (4,) and not errors.reference.requires_grad
    assert errors.policy_mismatched.shape == errors.reference_mismatched.shape == (2,)
    # LoRA's B starts at zero: the policy is the reference, on the batch and on the mismatched prompts alike
    torch.testing.assert_close(errors.policy, errors.reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(errors.policy_mismatched, errors.reference_mismatched, rtol=0, atol=1e-6)
    torch.testing.assert_close(errors.policy.detach(), policy_only.policy.detach(), rtol=0, atol=1e-6)
    assert not torch.allclose(errors.reference_mismatched, errors.reference[:2])  # other prompts, other errors


def test_a_sample_draws_the_same_whatever_its_batch(family):
    """Noise and t come from (seed, draw id): draw 3 gives the same error alone or in a batch of four."""
    x0, cond, draws = _inputs(family)
    full = forward.denoising_errors(family, x0, cond, draws, 7, ForwardPlan(reference=True))
    alone = forward.denoising_errors(family, x0[3:], cond[3:], draws[3:], 7, ForwardPlan(reference=True))
    torch.testing.assert_close(full.reference[3:], alone.reference, rtol=1e-5, atol=1e-6)
    other_seed = forward.denoising_errors(family, x0, cond, draws, 8, ForwardPlan(reference=True))
    assert not torch.allclose(full.reference, other_seed.reference)


def test_per_sample_weights_of_the_family_scale_the_errors(family, monkeypatch):
    """A family whose forward process weights samples (flow-matching loss weightings) gets weighted errors."""
    x0, cond, draws = _inputs(family)
    plain = forward.denoising_errors(family, x0, cond, draws, 0, ForwardPlan(reference=True, mismatched=2))
    noisy = family.noisy
    weight = torch.tensor([1.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr(family, "noisy", lambda x0, noise, t: Noised(*noisy(x0, noise, t)[:2], weight=weight))
    weighted = forward.denoising_errors(family, x0, cond, draws, 0, ForwardPlan(reference=True, mismatched=2))
    torch.testing.assert_close(weighted.reference, plain.reference * weight)
    torch.testing.assert_close(weighted.policy_mismatched, plain.policy_mismatched * weight[:2])


def test_the_lora_reference_is_the_adapter_free_unet_exactly(tiny_sd, tmp_path):
    """With trained (non-zero) adapters, the reference (adapters switched off) is bit for bit the UNet loaded without
    them, and the policy is not."""
    from diffusers import UNet2DConditionModel

    cfg = load_config(None, tiny_overrides(tiny_sd, tmp_path / "none.jsonl", tmp_path / "run", **{"lora.rank": 4}))
    family = load_family(cfg, weight_dtype=torch.float32, device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in family.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)  # LoRA B starts at 0: give the adapters an effect
    plain = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval()
    x0, cond, _ = _inputs(family)
    t = torch.tensor([5, 40, 70, 99])
    reference = family.predict(x0, t, cond, reference=True)
    with torch.no_grad():
        expected = plain(x0, t, encoder_hidden_states=cond.hidden_states, return_dict=False)[0]
        policy = family.predict(x0, t, cond)
    assert torch.equal(reference, expected)
    assert not torch.allclose(policy, expected)
    assert torch.equal(family.predict(x0, t, cond, reference=True), reference)  # the adapters came back on and off
