"""The official script's step design (apps/bench_official.py) is a faithful emulation: it trains, and its reference
weight swap predicts with the reference weights and leaves the trained weights (and their gradients) exactly as they were."""
import json

import pytest
import torch

from diffusion_kto.apps import bench_official
from diffusion_kto.apps import bench_step as bench
from diffusion_kto.config import ConfigError, load_config
from diffusion_kto.models import unwrap


def _overrides(tiny_sd, tmp_path, adapter="full", loss="kto_matched", steps=2):
    data = bench.write_feedback(tmp_path / "data", 16, n=6)
    s = bench.BenchSettings(model=str(tiny_sd), batch_size=2, steps=steps, warmup=0)
    return bench.mode_overrides(s, adapter, loss, data, tmp_path / "out", 16)


def _weights(module):
    """CPU copies of the weights (where the script keeps its reference), whatever device trains."""
    return [p.detach().to("cpu", copy=True) for p in unwrap(module).parameters()]


def _inputs(family, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.randint(0, family.num_train_timesteps, (n,), generator=g)
    return x_t.to(family.device), t.to(family.device), family.encode_prompts(["a red circle", "a blue square"][:n])


def test_steps_train_and_the_swap_predicts_with_the_reference_and_restores_exactly(tiny_sd, tmp_path):
    trainer = bench_official.official_trainer(load_config(None, _overrides(tiny_sd, tmp_path)))
    fam, unet = trainer.family, trainer.family.trainable_module()
    initial, reference = _weights(unet), bench_official.cpu_reference(trainer.family)
    loader, parts = iter(trainer.loader()), bench_official.PartTimes(torch.device("cpu"))
    for step in range(2):
        log = bench_official.official_step(trainer, next(loader), reference, step, parts)
        parts.next_step()
    assert all(k in log for k in ("loss", "kl", "policy_err", "ref_err")) and log["kl"] >= 0
    trained = _weights(unet)
    assert any(not torch.equal(a, b) for a, b in zip(trained, initial))  # the steps changed the UNet
    assert all(torch.equal(a, b) for a, b in zip(reference, initial))  # ... and not the CPU reference
    assert {"vae_encode", "text_encode", "swap", "reference"} <= set(parts.steps[0])

    x_t, t, cond = _inputs(fam)
    with torch.no_grad():
        policy = unet(x_t, t, encoder_hidden_states=cond.hidden_states, return_dict=False)[0]
    ref = bench_official.swapped_reference(fam, reference, x_t, t, cond)
    assert all(torch.equal(a, b) for a, b in zip(_weights(unet), trained))  # restored bit for bit
    assert not torch.allclose(ref, policy)  # not a no-op ...
    fresh = bench_official.official_trainer(load_config(None, _overrides(tiny_sd, tmp_path / "fresh")))
    with torch.no_grad():  # ... but the initial UNet's prediction
        expected = fresh.family.trainable_module()(x_t, t, encoder_hidden_states=cond.hidden_states, return_dict=False)[0]
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-6)


def test_backward_after_the_swap_gives_the_gradients_of_the_trained_weights(tiny_sd, tmp_path):
    """The swap happens between the policy forward and its backward, through .data, as in the script."""
    trainer = bench_official.official_trainer(load_config(None, _overrides(tiny_sd, tmp_path)))
    fam, unet = trainer.family, trainer.family.trainable_module()
    reference = [w + 0.05 * torch.randn_like(w) for w in bench_official.cpu_reference(fam)]  # a reference unlike the policy
    x_t, t, cond = _inputs(fam)

    def grads(swap: bool):
        unet.zero_grad(set_to_none=True)
        loss = unet(x_t, t, encoder_hidden_states=cond.hidden_states, return_dict=False)[0].pow(2).mean()
        if swap:
            bench_official.swapped_reference(fam, reference, x_t, t, cond)
        loss.backward()
        return [p.grad.clone() for p in unet.parameters() if p.grad is not None]

    plain, swapped = grads(False), grads(True)
    assert len(plain) == len(swapped) > 0 and all(torch.equal(a, b) for a, b in zip(plain, swapped))


def test_lora_reference_is_the_adapters_off(tiny_sd, tmp_path):
    trainer = bench_official.official_trainer(load_config(None, _overrides(tiny_sd, tmp_path, adapter="lora")))
    assert bench_official.cpu_reference(trainer.family) is None
    before = _weights(trainer.family.trainable_module())
    parts = bench_official.PartTimes(torch.device("cpu"))
    bench_official.official_step(trainer, next(iter(trainer.loader())), None, 0, parts)
    assert any(not torch.equal(a, b) for a, b in zip(_weights(trainer.family.trainable_module()), before))
    assert "swap" not in parts.steps[0]


def test_run_writes_a_trainer_shaped_summary_and_the_unet(tiny_sd, tmp_path):
    overrides = _overrides(tiny_sd, tmp_path, steps=3)
    summary = bench_official.run_official(overrides, warmup=1)
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["images_per_second"] > 0 and summary["images_per_second_after_warmup"] > 0
    assert summary["parts_ms"]["swap"] > 0 and summary["parts_ms"]["reference"] >= summary["parts_ms"]["swap"]
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_only_the_scripts_objective_is_emulated(tiny_sd, tmp_path):
    with pytest.raises(ConfigError, match="matched"):
        bench_official.official_trainer(load_config(None, _overrides(tiny_sd, tmp_path, loss="kto_mismatched")))
