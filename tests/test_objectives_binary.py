"""The objectives beyond the paper, from binary labels only (issue 23, docs/method.md): nft (after DiffusionNFT), bco
(Binary Classifier Optimization with its reward shift) and kto_paired (KTO plus same-prompt pairs when the batch has
them). Hand-derived values, gradient directions, invariances, resume state, and one short real run each."""
import json
import math

import pytest
import torch

from diffusion_kto import forward, losses
from diffusion_kto.config import load_config
from diffusion_kto.objectives import (BCO, KTO, NFT, OBJECTIVES, Errors, ForwardPlan, KTOPaired, Outputs,
                                      build_objective, prompt_groups)
from tiny import logged_metrics, tiny_overrides, write_feedback


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _softplus(x):
    return math.log1p(math.exp(x))


def _gather(t):
    """One process: gathering is the identity."""
    return t


def _f64(*values):
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------- registry, config


def test_registered_and_configurable_and_kto_stays_the_paper():
    for name, cls, attr, key, value in (("nft", NFT, "beta", "loss.nft_beta", 0.25),
                                        ("bco", BCO, "shift", "loss.reward_shift", "pooled"),
                                        ("kto_paired", KTOPaired, "pair_weight", "loss.pair_weight", 0.5)):
        assert OBJECTIVES[name] is cls and cls.needs_reference and not cls.paired and cls.needs_both_classes
        objective = build_objective(load_config(None, [f"loss.name={name}", f"{key}={value}"]))
        assert type(objective) is cls and getattr(objective, attr) == value
    cfg = load_config(None, [])
    assert cfg.loss.name == "kto" and type(build_objective(cfg)) is KTO  # the default is the paper's method
    assert (cfg.loss.nft_beta, cfg.loss.reward_shift, cfg.loss.pair_weight) == (1.0, "balanced", 1.0)
    assert build_objective(load_config(None, ["loss.name=bco", "loss.beta=7"])).beta == 7.0


def test_plans():
    assert NFT().plan(0, 4) == ForwardPlan(reference=True, outputs=True)
    assert BCO(1.0).plan(3, 4) == ForwardPlan(reference=True)
    assert KTOPaired(beta=1.0).plan(0, 4) == KTO(beta=1.0).plan(0, 4)  # KTO's reference point, mismatched included


# ---------------------------------------------------------------------------------------------------------- nft

# two samples of two elements: sample 0 liked, sample 1 disliked
POL = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
REF = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
TGT = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
LIKED2 = torch.tensor([True, False])


def test_nft_hand_values():
    """beta' = 0.5. Sample 0 (liked): v+ = 0.5 [1, 2] + 0.5 [0, 0] = [0.5, 1]; v+ - t = [-0.5, 0]; mean square 0.125;
    / beta' = 0.25. Sample 1 (disliked): v- = 1.5 [1, 1] - 0.5 [0, 0] = [1.5, 1.5]; v- - t = [1.5, -0.5]; mean square
    1.25; / beta' = 2.5. The other policy of each: sample 0 v- = [-0.5, -1] - [1, 1] -> (2.25 + 4) / 2 = 3.125;
    sample 1 v+ = [0.5, 0.5] - [0, 2] -> (0.25 + 2.25) / 2 = 1.25. Deviation ||pol - ref||^2: [2.5, 1]."""
    out = losses.nft_loss(POL, REF, TGT, LIKED2, beta=0.5)
    torch.testing.assert_close(out.losses, _f64(0.25, 2.5).float())
    torch.testing.assert_close(out.positive_err, _f64(0.125, 1.25).float())
    torch.testing.assert_close(out.negative_err, _f64(3.125, 1.25).float())
    torch.testing.assert_close(out.deviation, _f64(2.5, 1.0).float())
    weighted = losses.nft_loss(POL, REF, TGT, LIKED2, beta=0.5, weight=torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(weighted.losses, torch.tensor([0.5, 7.5]))  # the family's weight on both errors
    with pytest.raises(ValueError, match="beta"):
        losses.nft_loss(POL, REF, TGT, LIKED2, beta=0.0)


def test_nft_at_beta_one_the_liked_term_is_sft_and_the_disliked_one_mirrors():
    """beta' = 1: v+ = v_theta (liked: ||pol - t||^2, the SFT loss) and v- = 2 v_ref - v_theta. Sample 0: (0 + 1) / 2
    = 0.5; sample 1: 2 [1, 1] - 0 - [0, 2] = [2, 0] -> 2."""
    out = losses.nft_loss(POL, REF, TGT, LIKED2, beta=1.0)
    torch.testing.assert_close(out.losses, torch.tensor([0.5, 2.0]))


def test_nft_gradient_at_the_reference_is_plus_minus_sft_whatever_beta():
    """At v_theta = v_ref both implicit policies are v_ref; d loss / d v_theta = +2 (v_ref - t) / D liked and
    -2 (v_ref - t) / D disliked (D = 2 elements): ref [1, 3], t [0, 1] -> +-[1, 2], for any beta'. A small step
    against the gradient lowers a liked sample's policy error and raises a disliked one's."""
    ref, tgt = _f64(1.0, 3.0).expand(2, 2), _f64(0.0, 1.0).expand(2, 2)
    for beta in (0.1, 0.5, 1.0, 3.0):
        pol = ref.clone().requires_grad_(True)
        losses.nft_loss(pol, ref, tgt, LIKED2, beta=beta).losses.sum().backward()
        torch.testing.assert_close(pol.grad, _f64(1.0, 2.0, -1.0, -2.0).reshape(2, 2))
        stepped = pol.detach() - 0.01 * pol.grad
        err = lambda p: (p - tgt).pow(2).mean(dim=1)  # noqa: E731
        assert err(stepped)[0] < err(pol.detach())[0] and err(stepped)[1] > err(pol.detach())[1]


def test_nft_optimum_is_the_reference_plus_two_over_beta_times_the_improvement_direction():
    """One x_t, liked targets a = 2 with posterior share alpha = 1/4, disliked b = 0 (three of them), and the reference
    the mixture v_old = alpha a + (1 - alpha) b = 0.5 (DiffusionNFT's setting). The minimiser of the summed loss is
    v* = v_old + (2 / beta') Delta, Delta = alpha (a - v_old) = 0.375: 1.25 at beta' = 1, 2.0 at beta' = 0.5.
    (By hand at beta' = 1: d/dp [0.25 (p - 2)^2 + 0.75 (1 - p)^2] = 0 gives p = 1.25.)"""
    liked = torch.tensor([True, False, False, False])
    tgt = _f64(2.0, 0.0, 0.0, 0.0).reshape(4, 1)
    ref = torch.full((4, 1), 0.5, dtype=torch.float64)
    for beta, expected in ((1.0, 1.25), (0.5, 2.0)):
        p = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([p], lr=1.0, max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            loss = losses.nft_loss(p.expand(4, 1), ref, tgt, liked, beta=beta).losses.sum()
            loss.backward()
            return loss

        opt.step(closure)
        assert p.item() == pytest.approx(expected, abs=1e-5)


def test_nft_is_the_same_policy_in_epsilon_and_velocity_parameterisations():
    """A flow's velocity v and its implied epsilon = x_s + (1 - s) v are affine in the output at fixed (x_s, s), with
    the same coefficient for every model: the implicit policies (weights summing to 1) map onto each other, and the
    epsilon loss is the velocity loss times (1 - s)^2 per sample."""
    g = torch.Generator().manual_seed(0)
    x, v_pol, v_ref, v_tgt = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(4))
    s = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64).reshape(3, 1)
    to_eps = lambda v: x + (1 - s) * v  # noqa: E731
    liked = torch.tensor([True, False, True])
    for beta in (0.3, 1.0):
        vel = losses.nft_loss(v_pol, v_ref, v_tgt, liked, beta=beta)
        eps = losses.nft_loss(to_eps(v_pol), to_eps(v_ref), to_eps(v_tgt), liked, beta=beta)
        torch.testing.assert_close(eps.losses, vel.losses * (1 - s.reshape(3)).pow(2).float())
        torch.testing.assert_close(to_eps(beta * v_pol + (1 - beta) * v_ref),
                                   beta * to_eps(v_pol) + (1 - beta) * to_eps(v_ref))


def test_nft_objective_reads_the_outputs_and_logs():
    ref_err = (REF - TGT).pow(2).mean(dim=1)  # [1, 1]
    pol_err = (POL - TGT).pow(2).mean(dim=1)  # [0.5, 2]
    errors = Errors(policy=pol_err, reference=ref_err, outputs=Outputs(policy=POL, target=TGT, reference=REF))
    out = NFT(0.5).loss(errors, LIKED2, _gather)
    torch.testing.assert_close(out.losses, torch.tensor([0.25, 2.5]))
    assert out.metrics["positive_err"] == 0.125 and out.metrics["negative_err"] == 1.25
    assert out.metrics["deviation"] == 1.75 and out.metrics["ref_err"] == 1.0
    assert out.metrics["accuracy"] == 1.0  # g = [0.5, -1]: liked denoised better, disliked worse than the reference
    with pytest.raises(ValueError, match="raw policy and reference predictions"):
        NFT().loss(Errors(policy=pol_err, reference=ref_err), LIKED2, _gather)
    with pytest.raises(ValueError, match="> 0"):
        NFT(-1.0)


# ---------------------------------------------------------------------------------------------------------- bco

# batch 1: g = ref - policy = [0.5, -1, 0], beta 2 -> rewards [1, -2, 0]; liked, disliked, liked
B1 = Errors(policy=_f64(1.0, 2.0, 1.5), reference=_f64(1.5, 1.0, 1.5))
L1 = torch.tensor([True, False, True])
# batch 2: g = [0, 2] -> rewards [0, 4], both disliked
B2 = Errors(policy=_f64(1.0, 1.0), reference=_f64(1.0, 3.0))
L2 = torch.tensor([False, False])


def _bco_expected(rewards, liked, delta):
    return _f64(*[_softplus(-(1 if y else -1) * (r - delta)) for r, y in zip(rewards, liked)])


def test_bco_hand_values_balanced_shift():
    """Batch 1 is folded in first: liked mean (1 + 0) / 2 = 0.5, disliked mean -2, delta = (0.5 - 2) / 2 = -0.75;
    z = s (r - delta) = [1.75, 1.25, 0.75], loss = -log sigma(z) = softplus(-z). Batch 2 adds disliked 0 and 4:
    disliked mean (-2 + 0 + 4) / 3 = 2/3, delta = (0.5 + 2/3) / 2 = 7/12."""
    bco = BCO(2.0)
    assert bco.delta() == 0.0 and bco.state_dict() is None
    out = bco.loss(B1, L1, _gather)
    torch.testing.assert_close(out.losses, _bco_expected([1, -2, 0], [True, False, True], -0.75))
    assert out.metrics["delta"] == -0.75 and out.metrics["accuracy"] == 1.0
    assert out.metrics["reward_liked"] == 0.5 and out.metrics["reward_disliked"] == -2.0
    out = bco.loss(B2, L2, _gather)
    assert out.metrics["delta"] == pytest.approx(7 / 12)
    torch.testing.assert_close(out.losses, _bco_expected([0, 4], [False, False], 7 / 12))
    assert math.isnan(out.metrics["reward_liked"])  # no liked sample in this batch
    assert bco.state_dict() == {"liked_sum": 1.0, "liked_count": 2, "disliked_sum": 2.0, "disliked_count": 3}


def test_bco_pooled_shift_is_the_mean_of_every_reward():
    """TRL's form: batch 1 -> (1 - 2 + 0) / 3 = -1/3; after batch 2 -> (1 - 2 + 0 + 0 + 4) / 5 = 0.6."""
    bco = BCO(2.0, shift="pooled")
    out = bco.loss(B1, L1, _gather)
    torch.testing.assert_close(out.losses, _bco_expected([1, -2, 0], [True, False, True], -1 / 3))
    assert bco.loss(B2, L2, _gather).metrics["delta"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="reward shift"):
        BCO(1.0, shift="median")


def test_bco_shift_with_one_class_seen_and_over_processes():
    """Only liked rewards so far: delta is their mean. Two processes holding the same half each: the gathered batch
    counts every reward twice, and the means (so delta) are those of one."""
    state = losses.update_reward_shift(losses.RewardShift(), _f64(1.0, 3.0), torch.tensor([True, True]))
    assert losses.reward_shift_value(state) == 2.0 and losses.reward_shift_value(state, "pooled") == 2.0
    one, two = BCO(2.0), BCO(2.0)
    one.loss(B1, L1, _gather)
    two.loss(B1, L1, lambda t: torch.cat([t, t]))
    assert two.state_dict()["liked_count"] == 2 * one.state_dict()["liked_count"] and two.delta() == one.delta()


def test_bco_gradient_directions():
    """d loss / d policy_err > 0 for a liked sample (lower error, lower loss) and < 0 for a disliked one."""
    policy = torch.tensor([0.2, 0.2], requires_grad=True)
    BCO(10.0).loss(Errors(policy=policy, reference=torch.tensor([0.2, 0.2])), LIKED2, _gather).losses.sum().backward()
    assert policy.grad[0] > 0 > policy.grad[1]


def test_bco_state_round_trips_exactly_through_json():
    """A resumed objective continues delta as if never stopped: same state, same next losses bit for bit."""
    straight, first = BCO(3.0), BCO(3.0)
    noisy = Errors(policy=_f64(0.1234567, 0.7654321, 0.3), reference=_f64(0.3333333, 0.1111111, 0.2718281))
    for objective in (straight, first):
        objective.loss(noisy, L1, _gather)
    resumed = BCO(3.0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.state_dict() == straight.state_dict()
    assert torch.equal(resumed.loss(B1, L1, _gather).losses, straight.loss(B1, L1, _gather).losses)
    resumed.load_state_dict(None)
    assert resumed.state_dict() is None and resumed.delta() == 0.0


# --------------------------------------------------------------------------------------------------- kto_paired

A, B, C = (int(i) for i in prompt_groups(["a red circle", "a blue square", "a green circle"]))
EMPTY = int(prompt_groups([""])[0])


def test_kto_paired_hand_values():
    """g = ref - policy = [0.5, -1, 0], beta 1, matched Q_ref = max(0, mean g) = 0; KTO: 1 - sigma([0.5, 1, 0]).
    Samples 0 (liked) and 1 (disliked) share a prompt: m = beta (g_liked - g_disliked) = 1.5 for both rows;
    lambda 0.5 adds 0.5 * -log sigma(1.5) = 0.5 softplus(-1.5) to each; sample 2 is alone and keeps its KTO loss."""
    errors = Errors(policy=_f64(1.0, 2.0, 1.0), reference=_f64(1.5, 1.0, 1.0))
    groups = torch.tensor([A, A, B])
    out = KTOPaired(beta=1.0, reference_point="matched", pair_weight=0.5).loss(errors, L1, _gather, groups)
    pair = 0.5 * _softplus(-1.5)
    torch.testing.assert_close(out.losses, _f64(1 - _sig(0.5) + pair, 1 - _sig(1.0) + pair, 0.5))
    assert out.metrics["pairs"] == 1.0 and out.metrics["pair_accuracy"] == 1.0 and out.metrics["kl"] == 0.0


def test_kto_paired_averages_over_partners_and_skips_the_empty_prompt():
    """Row 0 (liked, prompt A) has two disliked partners: g = [0, 0.5, -0.5] (beta 2) -> m = 2 (0 - 0.5) = -1 and
    2 (0 + 0.5) = 1; its term is the mean (softplus(1) + softplus(-1)) / 2. Each disliked row has one partner. Two
    images of the empty prompt (caption dropout: different prompts) never pair."""
    errors = Errors(policy=_f64(1.0, 0.5, 1.5, 1.0, 1.0), reference=_f64(1.0, 1.0, 1.0, 1.0, 1.0))
    liked = torch.tensor([True, False, False, True, False])
    groups = torch.tensor([A, A, A, EMPTY, EMPTY])
    kto = KTO(beta=2.0, reference_point="none").loss(errors, liked, _gather, groups).losses
    out = KTOPaired(beta=2.0, reference_point="none", pair_weight=1.0).loss(errors, liked, _gather, groups)
    extra = out.losses - kto
    expected = [(_softplus(1.0) + _softplus(-1.0)) / 2, _softplus(1.0), _softplus(-1.0), 0.0, 0.0]
    torch.testing.assert_close(extra, _f64(*expected))
    assert out.metrics["pairs"] == 2.0 and out.metrics["pair_accuracy"] == 0.5


@pytest.mark.parametrize("groups, liked", [
    ([A, B, C, A], [True, False, True, True]),  # A has two images, both liked
    ([A, B, A, B], [True, False, True, False]),  # each prompt has a single label
    ([EMPTY, EMPTY, C, B], [True, False, True, False]),  # both labels only under the empty prompt
])
@pytest.mark.parametrize("reference_point", ["mismatched", "matched", "per_prompt", "none"])
def test_kto_paired_is_kto_bit_for_bit_without_pairs(groups, liked, reference_point):
    """No prompt with both labels: the same loss tensor values, gradients, metrics and Q_ref state as loss.name=kto."""
    groups, liked = torch.tensor(groups), torch.tensor(liked)
    runs = []
    for cls in (KTO, KTOPaired):
        policy = torch.tensor([0.31, 0.42, 0.27, 0.55], dtype=torch.float64, requires_grad=True)
        errors = Errors(policy=policy, reference=_f64(0.35, 0.40, 0.29, 0.50),
                        policy_mismatched=_f64(0.5, 0.4, 0.3, 0.2), reference_mismatched=_f64(0.6, 0.4, 0.35, 0.2))
        objective = cls(beta=30.0, reference_point=reference_point, reference_decay=0.0)
        out = objective.loss(errors, liked, _gather, groups)
        out.losses.mean().backward()
        runs.append((out, policy.grad, objective.state_dict()))
    (kto, kto_grad, kto_state), (paired, paired_grad, paired_state) = runs
    assert torch.equal(kto.losses, paired.losses) and torch.equal(kto_grad, paired_grad) and kto_state == paired_state
    assert {k: v for k, v in paired.metrics.items() if not k.startswith("pair")} == kto.metrics
    assert paired.metrics["pairs"] == 0.0 and math.isnan(paired.metrics["pair_accuracy"])


def test_kto_paired_pair_weight_zero_gives_kto_losses():
    errors = Errors(policy=_f64(1.0, 2.0, 1.0), reference=_f64(1.5, 1.0, 1.0))
    groups = torch.tensor([A, A, B])
    kto = KTO(beta=1.0, reference_point="matched").loss(errors, L1, _gather, groups)
    paired = KTOPaired(beta=1.0, reference_point="matched", pair_weight=0.0).loss(errors, L1, _gather, groups)
    assert torch.equal(kto.losses, paired.losses)


def test_kto_paired_gradient_of_the_pair_term():
    """Extra gradient over KTO's on d policy_err: d/d p_w of softplus(-beta (g_w - g_l)) = beta sigma(-m) (> 0: the
    liked image's error is pulled down), d/d p_l = -beta sigma(-m) (< 0: the disliked one's pushed up), times lambda.
    beta 1, g = [0.5, -1] -> m = 1.5, lambda 0.5: +-0.5 sigma(-1.5). The partner enters detached: each row gets the
    derivative of its own term only."""
    grads = []
    for cls, extra in ((KTO, {}), (KTOPaired, {"pair_weight": 0.5})):
        policy = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        errors = Errors(policy=policy, reference=_f64(1.5, 1.0))
        cls(beta=1.0, reference_point="none", **extra).loss(errors, LIKED2, _gather, torch.tensor([A, A])) \
            .losses.sum().backward()
        grads.append(policy.grad)
    torch.testing.assert_close(grads[1] - grads[0], _f64(0.5 * _sig(-1.5), -0.5 * _sig(-1.5)))
    assert (grads[1] - grads[0])[0] > 0 > (grads[1] - grads[0])[1]



def test_kto_paired_pairs_only_within_a_draw_when_draws_are_given():
    """Rows 0 (liked) and 1, 2 (disliked) share prompt A; only row 1 shares row 0's draw (the sampler's pair): with
    draws the pair term is row 0 x row 1 alone, m = beta (g_0 - g_1) = 2 (0 - 0.5) = -1; row 2 keeps KTO's loss.
    Without draws (no forward pass behind the errors) row 0 pairs with both, as in the test above."""
    errors = Errors(policy=_f64(1.0, 0.5, 1.5), reference=_f64(1.0, 1.0, 1.0), draws=torch.tensor([7, 7, 9]))
    liked, groups = torch.tensor([True, False, False]), torch.tensor([A, A, A])
    kto = KTO(beta=2.0, reference_point="none").loss(errors, liked, _gather, groups).losses
    out = KTOPaired(beta=2.0, reference_point="none", pair_weight=1.0).loss(errors, liked, _gather, groups)
    torch.testing.assert_close(out.losses - kto, _f64(_softplus(1.0), _softplus(1.0), 0.0))
    assert out.metrics["pairs"] == 1.0 and out.metrics["pair_accuracy"] == 0.0

def test_kto_paired_needs_groups():
    with pytest.raises(ValueError, match="prompt ids"):
        KTOPaired(beta=1.0, reference_point="none").loss(B1, L1, _gather)


def test_same_prompt_pairs_over_a_gathered_batch():
    """Process 0 holds rows 0, 1 of a batch whose row 2 (on another process) is the disliked partner of row 0:
    row 0 pairs with the gathered column, its partner's g detached."""
    g = torch.tensor([0.3, 0.1], requires_grad=True)
    g_all = torch.tensor([0.3, 0.1, -0.2])
    terms = losses.same_prompt_pairs(g, torch.tensor([True, True]), torch.tensor([A, B]), g_all,
                                     torch.tensor([True, True, False]), torch.tensor([A, B, A]), beta=2.0)
    assert terms.partners.tolist() == [1, 0]
    torch.testing.assert_close(terms.losses, torch.tensor([_softplus(-1.0), 0.0]))  # m = 2 (0.3 + 0.2) = 1


# -------------------------------------------------------------------------------------- the forward pass's outputs


@pytest.fixture(scope="module")
def family(tiny_sd, tmp_path_factory):
    from diffusion_kto.models import load_family

    out = tmp_path_factory.mktemp("fwd_outputs")
    cfg = load_config(None, tiny_overrides(tiny_sd, out / "none.jsonl", out / "run", **{"lora.rank": 2}))
    torch.manual_seed(0)
    return load_family(cfg, weight_dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("reference, mismatched", [(False, 0), (True, 0), (True, 2)])
def test_outputs_change_no_error_and_reproduce_them(family, reference, mismatched):
    """Asking for the raw predictions leaves every error bit for bit as it was; the predictions give them back."""
    from diffusion_kto import diffusion

    cond = family.encode_prompts(["a red circle", "a blue square", "a green circle", "a red square"])
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    draws = torch.tensor([0, 1, 2, 3])
    plain = forward.denoising_errors(family, x0, cond, draws, 0, ForwardPlan(reference, mismatched))
    asked = forward.denoising_errors(family, x0, cond, draws, 0, ForwardPlan(reference, mismatched, outputs=True))
    assert plain.outputs is None and asked.outputs is not None
    for name in ("policy", "reference", "policy_mismatched", "reference_mismatched"):
        a, b = getattr(plain, name), getattr(asked, name)
        assert (a is None and b is None) or torch.equal(a.detach(), b.detach()), name
    o = asked.outputs
    assert o.policy.requires_grad and (o.reference is None) == (not reference) and o.weight is None
    assert torch.equal(diffusion.per_sample_error(o.policy, o.target), asked.policy)
    if reference:
        assert not o.reference.requires_grad and torch.equal(diffusion.per_sample_error(o.reference, o.target),
                                                             asked.reference)


# -------------------------------------------------------------------------------------------- short real runs


def _paired_feedback(folder):
    """write_feedback's 8 rows (liked on even rows) under two prompts, 2 liked + 2 disliked each."""
    data = write_feedback(folder)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "prompt": "a red circle" if i < 4 else "a blue square"}) + "\n"
                            for i, r in enumerate(rows)))
    return data


def _train(pipe, data, out, **extra):
    from diffusion_kto.train import DiffusionKTOTrainer

    trainer = DiffusionKTOTrainer(load_config(None, tiny_overrides(pipe, data, out, **{"lora.rank": 2, **extra})))
    unet = trainer.family.trainable_module()
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    result = trainer.train()
    changed = {n for n, p in unet.named_parameters() if p.requires_grad and not torch.equal(before[n], p.detach())}
    return trainer, result, before.keys(), changed


@pytest.mark.parametrize("name, extra, logged", [
    ("nft", {"loss.nft_beta": 0.5}, {"positive_err", "negative_err", "deviation", "accuracy", "ref_err"}),
    ("bco", {}, {"delta", "reward_liked", "reward_disliked", "accuracy", "ref_err"}),
    ("kto_paired", {"loss.reference_point": "matched"}, {"kl", "pairs", "pair_accuracy"}),
])
def test_each_objective_trains_every_lora_weight(tiny_sd, tmp_path, name, extra, logged):
    _, result, trainable, changed = _train(tiny_sd, _paired_feedback(tmp_path / "d"), tmp_path / "run",
                                           **{"loss.name": name, **extra})
    assert result.steps == 3 and trainable and all("lora" in n for n in trainable) and changed == set(trainable)
    rows = logged_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 3 and all(logged <= row.keys() and math.isfinite(row["loss"]) for row in rows)
    if name == "kto_paired":  # loss.pair_share 0.5 of every batch is same-prompt pairs on one draw
        assert all(row["pairs"] >= 1 for row in rows)


def test_nft_trains_a_v_prediction_model(tiny_sd_v, tmp_path):
    """The same objective on a v-prediction network: the loss mixes its outputs as they are (docs/method.md)."""
    _, result, trainable, changed = _train(tiny_sd_v, _paired_feedback(tmp_path / "d"), tmp_path / "run",
                                           **{"loss.name": "nft", "train.max_steps": 2})
    assert result.steps == 2 and changed == set(trainable)


def test_bco_resume_equals_uninterrupted(tiny_sd, tmp_path):
    """4 straight steps == 2 steps + checkpoint + resume + 2 steps, bit for bit: the reward shift is in the
    checkpoint and continues where it was."""
    from safetensors.torch import load_file

    from diffusion_kto.train import checkpoint

    data = _paired_feedback(tmp_path / "d")
    common = {"loss.name": "bco", "train.checkpoint_every": 2}
    _train(tiny_sd, data, tmp_path / "a", **common, **{"train.max_steps": 4})
    _train(tiny_sd, data, tmp_path / "b", **common, **{"train.max_steps": 2})
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / "b" / "checkpoints"))["state"]
    assert state["reference"]["liked_count"] + state["reference"]["disliked_count"] == 2 * 4
    _train(tiny_sd, data, tmp_path / "b", **common, **{"train.max_steps": 4, "train.resume": "latest"})
    a, b = (load_file(str(tmp_path / r / "pytorch_lora_weights.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (logged_metrics(tmp_path / r / "metrics.jsonl") for r in ("a", "b"))
    assert la[2:] == lb[2:] and la[3]["delta"] == lb[3]["delta"]


def test_kto_paired_refuses_a_stream_unless_pairs_are_off():
    from types import SimpleNamespace

    from diffusion_kto.errors import ConfigError

    cfg = lambda share: SimpleNamespace(  # noqa: E731
        data=SimpleNamespace(streaming=True), train=SimpleNamespace(batch_size=4),
        loss=SimpleNamespace(pair_share=share, reference_point="matched", reference_fraction=1.0))
    with pytest.raises(ConfigError, match="loss.pair_share=0"):
        KTOPaired.check(cfg(0.5))
    KTOPaired.check(cfg(0.0))
