"""Pure flow-matching maths (flow.py), checked against values derived by hand on two-element examples."""
import math

import pytest
import torch

from diffusion_kto import diffusion, flow


def test_noisy_latent_velocity_and_error_by_hand():
    # x0 = [[1, 2], [3, 4]], eps = [[0, 1], [1, 0]], sigma = (1/4, 1/2):
    # x_sigma = (1 - sigma) x0 + sigma eps = [[3/4, 7/4], [2, 2]];  v = eps - x0 = [[-1, -1], [-2, -4]]
    x0, eps, sigma = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0.25, 0.5])
    assert torch.equal(flow.noisy(x0, eps, sigma), torch.tensor([[0.75, 1.75], [2.0, 2.0]]))
    v = flow.velocity(x0, eps)
    assert torch.equal(v, torch.tensor([[-1.0, -1.0], [-2.0, -4.0]]))
    # a network predicting 0: errors mean(1, 1) = 1 and mean(4, 16) = 10
    assert torch.equal(diffusion.per_sample_error(torch.zeros(2, 2), v), torch.tensor([1.0, 10.0]))
    # the ends of the path: sigma = 0 is the data, sigma = 1 the noise
    assert torch.equal(flow.noisy(x0, eps, torch.tensor([0.0, 1.0])), torch.stack([x0[0], eps[1]]))


def test_epsilon_error_is_velocity_error_times_one_minus_sigma_squared():
    """The relation behind beta's scale (docs/method.md): eps_hat = x_sigma + (1 - sigma) v_hat, so
    ||eps_hat - eps||^2 = (1 - sigma)^2 ||v_hat - v||^2."""
    x0, eps, sigma = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([0.25, 0.5])
    v_hat = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    x_t = flow.noisy(x0, eps, sigma)
    eps_hat = x_t + (1 - sigma)[:, None] * v_hat
    v_err = diffusion.per_sample_error(v_hat, flow.velocity(x0, eps))  # (1, 1) -> 1; (9, 25) -> 17
    assert torch.equal(v_err, torch.tensor([1.0, 17.0]))
    torch.testing.assert_close(diffusion.per_sample_error(eps_hat, eps), torch.tensor([0.5625 * 1.0, 0.25 * 17.0]))


def test_sd3_shift_and_flux_resolution_shift():
    # s = 3: sigma' = 3 sigma / (1 + 2 sigma): 1/4 -> 1/2, 1/2 -> 3/4; the ends stay
    torch.testing.assert_close(flow.shift(torch.tensor([0.25, 0.5, 0.0, 1.0]), 3.0), torch.tensor([0.5, 0.75, 0.0, 1.0]))
    assert torch.equal(flow.shift(torch.tensor([0.25, 0.5]), 1.0), torch.tensor([0.25, 0.5]))
    # Flux: mu = 0.5 at 256 tokens, 1.15 at 4096, linear between (a 1024 px image: 64 x 64 = 4096 tokens)
    assert flow.resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert flow.resolution_shift(4096) == pytest.approx(math.exp(1.15))
    assert flow.resolution_shift(2176) == pytest.approx(math.exp(0.825))  # halfway


def test_weightings_by_hand():
    sigma = torch.tensor([0.5, 0.25])
    assert flow.weighting("none", sigma) is None
    # logit-normal(0, 1): at 1/2 the logit is 0, density 1 / (sqrt(2 pi) / 4); at 1/4 the logit is -ln 3
    ln = flow.weighting("logit_normal", sigma)
    expected = [4 / math.sqrt(2 * math.pi), math.exp(-math.log(3) ** 2 / 2) / (math.sqrt(2 * math.pi) * 0.1875)]
    torch.testing.assert_close(ln, torch.tensor(expected))
    # cosmap: 2 / (pi - 2 pi sigma + 2 pi sigma^2): 4 / pi at 1/2, 2 / (pi (1 - 1/2 + 1/8)) = 16 / (5 pi) at 1/4
    torch.testing.assert_close(flow.weighting("cosmap", sigma), torch.tensor([4 / math.pi, 16 / (5 * math.pi)]))
    # mode(s): f(1/2) = 1/2 for every s, f'(1/2) = -1 - s (1 - pi/2): density 1 / (1 + s (1 - pi/2)); s = 0 is uniform
    mode = flow.weighting("mode", torch.tensor([0.5]), mode_scale=1.29)
    torch.testing.assert_close(mode, torch.tensor([1 / (1 + 1.29 * (1 - math.pi / 2))]))
    torch.testing.assert_close(flow.weighting("mode", sigma, mode_scale=0.0), torch.ones(2))
    with pytest.raises(ValueError, match="cosine"):
        flow.weighting("cosine", sigma)


def test_mode_map_ends_and_monotone():
    u = torch.linspace(0, 1, 101)
    f = flow.mode_sigma(u, 1.29)
    assert f[0] == 1.0 and abs(float(f[-1])) < 1e-6 and bool((f[1:] <= f[:-1]).all())


@pytest.mark.parametrize("law", flow.LAWS)
def test_draws_depend_only_on_seed_draw_id_and_stream(law):
    a = flow.draw(law, 7, torch.tensor([5, 6, 7, 8]), 1)
    b = flow.draw(law, 7, torch.tensor([8, 7]), 1)
    assert a[3] == b[0] and a[2] == b[1] and ((a > 0) & (a < 1)).all() and a.dtype == torch.float32
    assert not torch.equal(a, flow.draw(law, 7, torch.tensor([5, 6, 7, 8]), 2))


def test_logit_normal_draw_is_the_sigmoid_of_the_generator_normal():
    g = diffusion.step_generator(3, 11, 1)
    expected = torch.sigmoid(0.5 + 2.0 * torch.randn(1, generator=g))
    torch.testing.assert_close(flow.draw("logit_normal", 3, torch.tensor([11]), 1, logit_mean=0.5, logit_std=2.0),
                               expected)
    many = flow.draw("logit_normal", 0, torch.arange(4000), 1)
    assert abs(float(torch.logit(many).mean())) < 0.06 and abs(float(torch.logit(many).std()) - 1) < 0.05
