"""Pure diffusion maths: targets, per-sample errors and counter-based randomness."""
import pytest
import torch
from diffusers import DDPMScheduler

from diffusion_kto import diffusion


def test_targets_epsilon_and_v():
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 10, 999])
    eps = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(diffusion.target(eps, x0, noise, t), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    abar = v.alphas_cumprod[t].view(3, 1, 1, 1)
    torch.testing.assert_close(diffusion.target(v, x0, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * x0)


def test_unknown_prediction_type():
    s = DDPMScheduler()
    s.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="flow"):
        diffusion.target(s, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_per_sample_error_shape_and_value():
    pred = torch.zeros(2, 4, 2, 2)
    tgt = torch.stack([torch.ones(4, 2, 2), 2 * torch.ones(4, 2, 2)])
    torch.testing.assert_close(diffusion.per_sample_error(pred, tgt), torch.tensor([1.0, 4.0]))


def test_per_sample_draws_depend_only_on_draw_id():
    """A sample's noise and timestep do not depend on which batch or process it lands in."""
    a = diffusion.per_sample_randn((4, 2, 2), 7, torch.tensor([5, 6, 7, 8]), 2)
    b = diffusion.per_sample_randn((4, 2, 2), 7, torch.tensor([7, 8]), 2)
    torch.testing.assert_close(a[2:], b)
    ta = diffusion.per_sample_timesteps(1000, 7, torch.tensor([5, 6, 7, 8]), 1)
    tb = diffusion.per_sample_timesteps(1000, 7, torch.tensor([8]), 1)
    assert ta[3] == tb[0] and ta.dtype == torch.long and ((ta >= 0) & (ta < 1000)).all()
    assert not torch.equal(diffusion.per_sample_randn((4,), 7, torch.tensor([5]), 2),
                           diffusion.per_sample_randn((4,), 7, torch.tensor([5]), 3))
