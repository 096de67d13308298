"""The objectives: what each needs, its prompt rewrites, its reference point, and its loss on hand-derived errors."""
import math

import pytest
import torch

from diffusion_kto.config import ConfigError, LossConfig, load_config
from diffusion_kto.objectives import CSFT, DPO, KTO, OBJECTIVES, SFT, Errors, build_objective


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _gather(t):
    """One process: gathering is the identity."""
    return t


ERRORS = Errors(policy=torch.tensor([1.0, 2.0], dtype=torch.float64),
                reference=torch.tensor([1.5, 1.0], dtype=torch.float64))
LIKED = torch.tensor([True, False])


def test_registry_is_what_the_config_accepts():
    choices = next(f for f in LossConfig.__dataclass_fields__.values() if f.name == "name").metadata["choices"]
    assert tuple(OBJECTIVES) == choices == ("kto", "sft", "csft", "dpo", "kto_paired", "bco", "nft")
    for name, cls in OBJECTIVES.items():
        assert isinstance(build_objective(load_config(None, [f"loss.name={name}"])), cls) and cls.name == name


def test_what_each_objective_needs():
    """KTO and DPO need the reference; only DPO draws pairs; SFT draws liked rows only and needs no disliked ones."""
    needs = {n: (c.needs_reference, c.paired, c.needs_both_classes) for n, c in OBJECTIVES.items()}
    assert needs == {"kto": (True, False, True), "sft": (False, False, False), "csft": (False, False, True),
                     "dpo": (True, True, True), "kto_paired": (True, False, True), "bco": (True, False, True),
                     "nft": (True, False, True)}
    assert KTO(beta=1).liked_share(0.8) == 0.8 and CSFT().liked_share(0.8) == 0.8
    # KTO needs both classes only while it draws both (0 < gamma < 1); its pair variant always
    both = {n: [c.needs_both(g) for g in (0.0, 0.5, 1.0)] for n, c in OBJECTIVES.items()}
    assert both["kto"] == [False, True, False] and both["sft"] == [False] * 3
    assert all(both[n] == [True] * 3 for n in ("csft", "dpo", "kto_paired", "bco", "nft"))
    assert "data.desirable_ratio=1.0" in KTO.one_class_setting and not OBJECTIVES["kto_paired"].one_class_setting
    assert SFT().liked_share(0.8) == 1.0 and DPO(1.0).liked_share(0.8) == 1.0


def test_kto_matched_hand_values():
    """g = ref - policy = [0.5, -1.0]; Q_ref = max(0, mean g) = max(0, -0.25) = 0; z = s beta (g - Q) = [0.5, 1.0]
    (beta 1, the second sample disliked); loss = 1 - sigma(z)."""
    out = KTO(beta=1.0, reference_point="matched").loss(ERRORS, LIKED, _gather)
    torch.testing.assert_close(out.losses, torch.tensor([1 - _sig(0.5), 1 - _sig(1.0)], dtype=torch.float64))
    assert out.metrics["kl"] == 0.0 and out.metrics["accuracy"] == 1.0
    assert out.metrics["reward_liked"] == 0.5 and out.metrics["reward_disliked"] == -1.0
    assert out.metrics["ref_err"] == 1.25


def test_kto_centred_hand_values():
    """g = [0.5, -1.0], Q_ref = mean g = -0.25 (not clamped); z_1 = beta (g_1 - Q) and z_2 = -beta (g_2 - Q) both equal
    beta (g_1 - g_2) / 2 = 0.75. With g = ref - policy and Q's gradient, dz_1/dp = beta [-1/2, 1/2] = dz_2/dp, so
    d(loss_1 + loss_2)/dp = -sigma'(0.75) [-1, 1]: equal and opposite, no common mode."""
    policy = ERRORS.policy.clone().requires_grad_(True)
    out = KTO(beta=1.0, reference_point="centred").loss(Errors(policy=policy, reference=ERRORS.reference), LIKED,
                                                            _gather)
    torch.testing.assert_close(out.losses.detach(), torch.full((2,), 1 - _sig(0.75), dtype=torch.float64))
    assert out.metrics["kl"] == -0.25
    out.losses.sum().backward()
    w = _sig(0.75) * (1 - _sig(0.75))  # sigma'(0.75)
    torch.testing.assert_close(policy.grad, torch.tensor([w, -w], dtype=torch.float64))
    assert KTO(beta=1.0, reference_point="centred").plan(0, 2).mismatched == 0


def test_kto_on_likes_only_hand_values():
    """Both samples liked (gamma = 1): g = [0.5, -1.0], Q_ref = max(0, -0.25) = 0, z = beta (g - Q) = [0.5, -1.0];
    loss = 1 - sigma(z); the disliked reward is NaN (no disliked sample), accuracy the share with z > 0."""
    out = KTO(beta=1.0, reference_point="matched").loss(ERRORS, torch.tensor([True, True]), _gather)
    torch.testing.assert_close(out.losses, torch.tensor([1 - _sig(0.5), 1 - _sig(-1.0)], dtype=torch.float64))
    assert out.metrics["reward_liked"] == -0.25 and math.isnan(out.metrics["reward_disliked"])
    assert out.metrics["accuracy"] == 0.5


def test_kto_mismatched_reference_point_and_its_running_mean():
    """Q_ref from the mismatched errors: mean(ref - policy) = mean([0.3, 0.1]) = 0.2; with decay 0.5 the next
    estimate 0.6 gives (0.5 * 0.2 + 0.6) / 1.5 = 0.4667; without a fresh estimate the value is reused."""
    kto = KTO(beta=1.0, reference_every=2, reference_decay=0.5)
    mis = lambda p, r: Errors(policy=ERRORS.policy, reference=ERRORS.reference,  # noqa: E731
                              policy_mismatched=torch.tensor(p), reference_mismatched=torch.tensor(r))
    assert kto.plan(0, 4).mismatched == 4  # no estimate yet
    assert float(kto.reference_point(mis([1.0, 1.0], [1.3, 1.1]), _gather)) == pytest.approx(0.2)
    assert kto.plan(1, 4).mismatched == 0 and kto.plan(2, 4).mismatched == 4
    assert float(kto.reference_point(ERRORS, _gather)) == pytest.approx(0.2)  # reused
    assert float(kto.reference_point(mis([1.0, 1.0], [1.7, 1.5]), _gather)) == pytest.approx(0.7 / 1.5)
    state = kto.state_dict()
    again = KTO(beta=1.0, reference_every=2, reference_decay=0.5)
    again.load_state_dict(state)
    assert again.state_dict() == state and again.plan(1, 4).mismatched == 0
    assert KTO(beta=1.0, reference_fraction=0.5).plan(0, 5).mismatched == 3  # ceil(0.5 * 5)


def test_kto_reference_point_none_is_zero():
    kto = KTO(beta=1.0, reference_point="none")
    assert float(kto.reference_point(ERRORS, _gather)) == 0.0 and kto.plan(0, 2).mismatched == 0


def test_kto_refuses_a_batch_too_small_to_mismatch():
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        load_config(None, ["train.batch_size=1"])
    with pytest.raises(ConfigError, match="reference_fraction=0.25 leaves fewer than 2"):
        load_config(None, ["train.batch_size=4", "loss.reference_fraction=0.25"])
    assert load_config(None, ["train.batch_size=1", "loss.name=sft"]).train.batch_size == 1


def test_sft_and_csft_losses():
    torch.testing.assert_close(SFT().loss(ERRORS, LIKED, _gather).losses, torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(CSFT().loss(ERRORS, LIKED, _gather).losses, ERRORS.policy)


def test_csft_conditions_on_the_label():
    prefix, suffix = CSFT("prefix"), CSFT("suffix")
    assert prefix.condition("a cat", True) == "good image, a cat" and prefix.condition("a cat", False) == "bad image, a cat"
    assert suffix.condition("a cat", False) == "a cat, bad image" and suffix.sampling_prompt("a cat") == "a cat, good image"
    assert prefix.prompts_used(["a", "b", "a", ""]) == ["good image, a", "bad image, a", "good image, b", "bad image, b",
                                                        "good image, ", "bad image, "]
    assert KTO(beta=1).prompts_used(["a", "b", "a"]) == ["a", "b"] and KTO(beta=1).condition("a", False) == "a"


def test_dpo_loss_on_pairs_and_its_refusal_of_streams():
    """Pairs: preferred images first. policy (w, l) = (1, 3), ref (w, l) = (2, 2): inside = -beta/2 ((1-3) - 0) = 1."""
    errors = Errors(policy=torch.tensor([1.0, 3.0]), reference=torch.tensor([2.0, 2.0]))
    out = DPO(beta=1.0).loss(errors, torch.tensor([True, False]), _gather)
    torch.testing.assert_close(out.losses, torch.tensor([-math.log(_sig(1.0))]))
    assert out.metrics["accuracy"] == 1.0 and out.metrics["margin"] == 1.0
    with pytest.raises(ConfigError, match="data.streaming: loss.name=dpo"):
        load_config(None, ["loss.name=dpo", "data.streaming=true", "data.path=x"])
