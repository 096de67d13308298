"""Hand-derived values for the loss maths (paper Eq. 8, §4.1–4.2, App. D.4)."""
import math

import pytest
import torch

from diffusion_kto import losses


def _sig(x):
    return 1 / (1 + math.exp(-x))


POLICY = torch.tensor([0.10, 0.20, 0.30, 0.40], dtype=torch.float64)
REF = torch.tensor([0.12, 0.19, 0.30, 0.43], dtype=torch.float64)
LIKED = torch.tensor([True, False, True, False])


def _expected(utility, beta, kl, wd, wu):
    """Per-sample loss written out by hand: lambda_y (1 - U(s beta (g - kl)))."""
    out = []
    for p, r, y in zip(POLICY.tolist(), REF.tolist(), LIKED.tolist()):
        g = r - p
        z = (1 if y else -1) * beta * (g - kl)
        u = {"kt": _sig(z), "loss_averse": math.log(_sig(z)), "risk_seeking": -math.log(_sig(-z))}[utility]
        out.append((wd if y else wu) * (1 - u))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("utility", ["kt", "loss_averse", "risk_seeking"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33), (0.5, 2.0)])
def test_kto_loss_matches_formula(utility, weights):
    beta, kl = 50.0, 0.004
    out = losses.kto_loss(POLICY, REF, LIKED, kl, beta=beta, utility=utility,
                          desirable_weight=weights[0], undesirable_weight=weights[1])
    assert out.losses.shape == (4,)
    torch.testing.assert_close(out.losses, _expected(utility, beta, kl, *weights), atol=1e-6, rtol=0)


def test_hand_values_kt():
    """g = [0.02, -0.01, 0, 0.03], kl = 0, beta = 100 -> z = [2, 1, 0, -3] -> 1 - sigmoid(z)."""
    out = losses.kto_loss(POLICY, REF, LIKED, 0.0, beta=100.0)
    expected = torch.tensor([1 - _sig(2), 1 - _sig(1), 0.5, 1 - _sig(-3)], dtype=torch.float64)
    torch.testing.assert_close(out.losses, expected, atol=1e-6, rtol=0)
    assert out.accuracy.item() == pytest.approx(0.5)  # z > 0 for samples 0 and 1
    torch.testing.assert_close(out.rewards, torch.tensor([2.0, -1.0, 0.0, 3.0], dtype=torch.float64))


def test_equal_errors_give_half():
    """At initialisation policy == reference: every KT loss is 1 - sigmoid(0) = 0.5."""
    e = torch.rand(6)
    out = losses.kto_loss(e, e.clone(), torch.tensor([True, False] * 3), 0.0, beta=5000.0)
    torch.testing.assert_close(out.losses, torch.full((6,), 0.5))


def test_gradient_signs():
    """Lowering the policy error lowers the loss of a liked sample and raises that of a disliked one."""
    policy = torch.tensor([0.2, 0.2], requires_grad=True)
    out = losses.kto_loss(policy, torch.tensor([0.2, 0.2]), torch.tensor([True, False]), 0.0, beta=10.0)
    out.losses.sum().backward()
    assert policy.grad[0] > 0  # liked: d loss / d policy_err > 0
    assert policy.grad[1] < 0  # disliked


def test_label_flip_mirrors_loss():
    """With kl = 0, flipping a label turns z into -z."""
    a = losses.kto_loss(POLICY, REF, LIKED, 0.0, beta=30.0).losses
    b = losses.kto_loss(POLICY, REF, ~LIKED, 0.0, beta=30.0).losses
    torch.testing.assert_close(a + b, torch.ones(4, dtype=torch.float64))  # sigmoid(z) + sigmoid(-z) = 1


def test_weights_scale_only_their_group():
    base = losses.kto_loss(POLICY, REF, LIKED, 0.0, beta=30.0).losses
    w = losses.kto_loss(POLICY, REF, LIKED, 0.0, beta=30.0, desirable_weight=3.0).losses
    torch.testing.assert_close(w[LIKED], 3 * base[LIKED])
    torch.testing.assert_close(w[~LIKED], base[~LIKED])


@pytest.mark.parametrize("liked", [True, False])
def test_single_class_batches_are_finite(liked):
    flags = torch.full((4,), liked)
    out = losses.kto_loss(POLICY, REF, flags, losses.reference_point(POLICY, REF), beta=5000.0)
    assert torch.isfinite(out.losses).all()


def test_reference_point_mean_then_clamp():
    """mean(ref - policy) = (0.02 - 0.01 + 0 + 0.03) / 4 = 0.01; a negative mean clamps to 0."""
    assert losses.reference_point(POLICY, REF).item() == pytest.approx(0.01)
    assert losses.reference_point(REF, POLICY).item() == 0.0
    p = torch.tensor([0.1], requires_grad=True)
    assert not losses.reference_point(p, torch.tensor([0.5])).requires_grad


def test_centred_reference_point_value_and_gradient():
    """Valued at the global mean (here 0.4, another process's samples included), differentiated through the local
    mean: dQ/dg_k = 1/B for each local sample; negative means are kept (no clamp)."""
    g = torch.tensor([0.1, -0.7], requires_grad=True)
    q = losses.centred_reference_point(g, torch.tensor(0.4))
    assert q.item() == pytest.approx(0.4)
    q.backward()
    torch.testing.assert_close(g.grad, torch.tensor([0.5, 0.5]))
    assert losses.centred_reference_point(torch.tensor([-0.3, -0.5]), torch.tensor(-0.4)).item() == pytest.approx(-0.4)
    with pytest.raises(ValueError):
        losses.centred_reference_point(torch.tensor([]), torch.tensor(0.0))


def test_centred_kto_loss_is_blind_to_a_common_shift():
    """With the centred Q_ref each z_i = s_i beta (g_i - mean g): adding c to every policy error leaves every loss,
    and the gradient's sum over the samples (d L / d c) is 0. Hand values: g = [0.02, -0.01, 0, 0.03] - hence
    mean 0.01, z = beta * s * (g - 0.01) = 30 * [0.01, 0.02, -0.01, 0.02] for liked, disliked, liked, liked."""
    flags = torch.tensor([True, False, True, True])
    policy = POLICY.clone().requires_grad_(True)
    g = losses.implicit_reward(policy, REF)
    q = losses.centred_reference_point(g, g.detach().mean())
    out = losses.kto_loss(policy, REF, flags, q, beta=30.0, reference_grad=True)
    z = 30.0 * torch.tensor([0.01, 0.02, -0.01, 0.02], dtype=POLICY.dtype)
    torch.testing.assert_close(out.losses, 1 - torch.sigmoid(z))
    out.losses.sum().backward()
    assert abs(policy.grad.sum().item()) < 1e-6 and policy.grad.abs().sum().item() > 1e-3
    shifted = POLICY + 0.5
    gs = losses.implicit_reward(shifted, REF)
    again = losses.kto_loss(shifted, REF, flags, losses.centred_reference_point(gs, gs.mean()), beta=30.0,
                            reference_grad=True)
    torch.testing.assert_close(again.losses, out.losses.detach(), atol=1e-5, rtol=1e-5)
    # without reference_grad the same Q_ref is detached: the common mode comes back
    plain = POLICY.clone().requires_grad_(True)
    losses.kto_loss(plain, REF, flags, q.detach(), beta=30.0).losses.sum().backward()
    assert abs(plain.grad.sum().item()) > 1e-3


def test_reference_point_batch_of_one_and_empty():
    assert losses.reference_point(torch.tensor([0.1]), torch.tensor([0.3])).item() == pytest.approx(0.2)
    with pytest.raises(ValueError):
        losses.reference_point(torch.tensor([]), torch.tensor([]))


def test_kl_shifts_the_reward():
    """g - kl: with kl = g every sample sits at z = 0."""
    g = REF - POLICY
    out = losses.kto_loss(POLICY, REF, LIKED, g[0].item(), beta=100.0)
    assert out.losses[0].item() == pytest.approx(0.5)


def test_unknown_utility():
    with pytest.raises(ValueError, match="kt"):
        losses.kto_loss(POLICY, REF, LIKED, 0.0, beta=1.0, utility="prospect")


def test_sft_loss_only_liked():
    out = losses.sft_loss(POLICY, LIKED).losses
    torch.testing.assert_close(out, torch.tensor([0.10, 0.0, 0.30, 0.0], dtype=torch.float64))


def test_dpo_loss_hand_values():
    """(pw - pl) - (rw - rl) = (0.1 - 0.3) - (0.2 - 0.2) = -0.2; beta = 10 -> inside = -5 * -0.2 = 1."""
    out = losses.dpo_loss(torch.tensor([0.1, 0.3]), torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.2]),
                          torch.tensor([0.2, 0.2]), beta=10.0)
    expected = torch.tensor([-math.log(_sig(1.0)), -math.log(_sig(-1.0))])
    torch.testing.assert_close(out.losses, expected, atol=1e-6, rtol=0)
    assert out.accuracy.item() == pytest.approx(0.5)


def test_dpo_gradient_prefers_the_chosen_image():
    pw = torch.tensor([0.2], requires_grad=True)
    pl = torch.tensor([0.2], requires_grad=True)
    losses.dpo_loss(pw, pl, torch.tensor([0.2]), torch.tensor([0.2]), beta=100.0).losses.sum().backward()
    assert pw.grad.item() > 0 and pl.grad.item() < 0  # lower error on the chosen, higher on the rejected


def test_running_reference_hand_values():
    """m_n = d m_{n-1} + (1-d) q_n, value m_n / (1 - d^n): with d = 0.5, q = 2, 4, 1:
    n=1: m = 1, value 1 / 0.5 = 2; n=2: m = 0.5 + 2 = 2.5, value 2.5 / 0.75 = 10/3 = (0.5*2 + 4) / 1.5;
    n=3: m = 1.25 + 0.5 = 1.75, value 1.75 / 0.875 = 2 = (0.25*2 + 0.5*4 + 1) / 1.75."""
    ref = None
    for q, value, raw in ((2.0, 2.0, 1.0), (4.0, 10 / 3, 2.5), (1.0, 2.0, 1.75)):
        ref = losses.running_reference(ref, torch.tensor(q), 0.5)
        assert float(ref.value) == pytest.approx(value) and float(ref.raw) == pytest.approx(raw)
    assert ref.count == 3


def test_running_reference_decay_zero_is_the_newest_estimate():
    ref = None
    for q in (0.3, 0.0, 7.0):
        ref = losses.running_reference(ref, torch.tensor(q), 0.0)
        assert torch.equal(ref.value, torch.tensor(q))  # exactly: the paper's per-batch Q_ref


def test_running_reference_rejects_decay_one():
    with pytest.raises(ValueError, match="decay"):
        losses.running_reference(None, torch.tensor(1.0), 1.0)
