"""loss.reference_point=per_prompt: Q_ref of each sample from the batch's samples of its own prompt, hand-derived."""
import hashlib
import math

import pytest
import torch

from diffusion_kto.config import load_config
from diffusion_kto.losses import prompt_reference_point
from diffusion_kto.objectives import KTO, Errors, build_objective, prompt_groups

# g = ref - policy = [0.4, -0.1, 0.0, -0.2, 0.3]; prompts: A A B B C
POLICY = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.1], dtype=torch.float64)
REFERENCE = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.4], dtype=torch.float64)
GROUPS = torch.tensor([7, 7, 9, 9, 3])


def test_hand_values():
    """A: mean(0.4, -0.1) = 0.15; B: mean(0.0, -0.2) = -0.1, clamped to 0; C is alone in the batch and takes the
    batch-wide mean (0.4 - 0.1 + 0 - 0.2 + 0.3) / 5 = 0.08."""
    q = prompt_reference_point(POLICY, REFERENCE, GROUPS)
    torch.testing.assert_close(q, torch.tensor([0.15, 0.15, 0.0, 0.0, 0.08], dtype=torch.float32))
    assert not q.requires_grad


def test_local_slice_of_a_gathered_batch():
    """Two processes: the first holds samples 0, 2 (A, B), the second 1, 3, 4; each gets its own samples' Q_ref
    computed over the whole gathered batch."""
    q = prompt_reference_point(POLICY, REFERENCE, GROUPS, local_groups=torch.tensor([7, 9]))
    torch.testing.assert_close(q, torch.tensor([0.15, 0.0]))


def test_kto_loss_uses_one_reference_per_sample():
    """z_i = s_i beta (g_i - Q_i), beta 2, liked = [1, 0, 1, 0, 1]: z = 2 * [0.25, 0.25, 0.0, 0.2, 0.22]."""
    kto = KTO(beta=2.0, reference_point="per_prompt")
    liked = torch.tensor([True, False, True, False, True])
    out = kto.loss(Errors(policy=POLICY, reference=REFERENCE), liked, lambda t: t, GROUPS)
    z = [0.5, 0.5, 0.0, 0.4, 0.44]
    torch.testing.assert_close(out.losses, torch.tensor([1 - 1 / (1 + math.exp(-v)) for v in z], dtype=torch.float64))
    assert out.metrics["kl"] == pytest.approx((0.15 * 2 + 0.08) / 5)
    assert kto.plan(0, 5).reference and kto.plan(0, 5).mismatched == 0  # the batch's own reference errors
    with pytest.raises(ValueError, match="needs the prompt ids"):
        kto.loss(Errors(policy=POLICY, reference=REFERENCE), liked, lambda t: t)


def test_prompt_ids_are_stable_and_config_accepts_the_choice():
    ids = prompt_groups(["a red circle", "a blue square", "a red circle"])
    assert ids.dtype == torch.int64 and ids[0] == ids[2] != ids[1] and (ids >= 0).all()
    # the first 7 bytes of the SHA-1 of the text: the same in every process (Python's hash() is salted per process)
    assert int(prompt_groups(["a red circle"])[0]) == int.from_bytes(hashlib.sha1(b"a red circle").digest()[:7], "big")
    cfg = load_config(None, ["loss.reference_point=per_prompt", "train.batch_size=1"])
    assert build_objective(cfg).reference_mode == "per_prompt"
