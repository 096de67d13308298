"""model.quantize_base: LoRA on a quantized frozen transformer. On the CPU, torchao's int8 and fp8 weight-only bases
train and export for real; bitsandbytes' nf4 needs CUDA (its test skips without one, and the CPU refusal is tested)."""
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tiny import tiny_overrides
from diffusion_kto.config import ConfigError, load_config
from diffusion_kto.models.quantize import quantized_linears
from diffusion_kto.train import DiffusionKTOTrainer

pytest.importorskip("torchao", reason="model.quantize_base=int8 / fp8 need torchao (the [quant] extra)")


def _cfg(pipe, data, out, **extra):
    return load_config(None, tiny_overrides(pipe, data, out, **{"lora.rank": 4, **extra}))


def _quantized_weights(module):
    """name -> (weight type, dequantized copy) of every quantized leaf weight."""
    out = {}
    for name, m in module.named_modules():
        w = getattr(m, "weight", None)
        if not list(m.children()) and w is not None and type(w) not in (torch.Tensor, torch.nn.Parameter):
            out[name] = (type(w), w.dequantize().clone())
    return out


def _image(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline("a red circle", generator=torch.Generator().manual_seed(0), height=16, width=16,
                    num_inference_steps=3, max_sequence_length=8, output_type="np").images


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_lora_on_a_quantized_base_trains_the_adapters_only_and_exports(kind, tiny_flux, feedback, tmp_path):
    """The frozen transformer stays quantized and unchanged, every LoRA weight (fp32, fp32 Adam state) changes, and
    the exported file loads in FluxPipeline and changes its fixed-seed image."""
    from diffusers import FluxPipeline

    trainer = DiffusionKTOTrainer(_cfg(tiny_flux, feedback, tmp_path / "run", **{
        "model.quantize_base": kind, "optim.lr": 1e-2}))
    net = trainer.family.trainable_module()
    frozen = _quantized_weights(net)
    assert len(frozen) == quantized_linears(net) > 0
    lora = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    assert lora and all("lora" in n and p.dtype == torch.float32 for n, p in lora.items())
    assert trainer.train().steps == 3
    params = dict(net.named_parameters())
    assert all(not torch.equal(lora[n], params[n].detach()) for n in lora)  # every adapter weight moved
    after = _quantized_weights(net)
    assert after.keys() == frozen.keys()
    assert all(after[n][0] is frozen[n][0] and torch.equal(after[n][1], frozen[n][1]) for n in frozen)
    states = [s for s in trainer.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    exported = load_file(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    assert exported and all(v.dtype == torch.float32 for v in exported.values())
    before = _image(FluxPipeline.from_pretrained(tiny_flux))
    loaded = FluxPipeline.from_pretrained(tiny_flux)
    loaded.load_lora_weights(tmp_path / "run")
    assert np.abs(_image(loaded) - before).max() > 1e-3
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["quantize_base"] == kind


def test_reference_of_a_quantized_base_is_the_quantized_base(tiny_flux, feedback, tmp_path):
    """Adapters off gives the quantized base's own prediction (the reference is quantized like the policy's base)."""
    trainer = DiffusionKTOTrainer(_cfg(tiny_flux, feedback, tmp_path / "run", **{"model.quantize_base": "int8",
                                                                                 "optim.lr": 1e-2}))
    trainer.train()
    fam = trainer.family
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, cond = torch.tensor([0.3, 0.8]), fam.encode_prompts(["a red circle", "a blue square"])
    net = fam.trainable_module()
    with torch.no_grad():
        net.disable_adapters()
        base = fam.forward(net, x, sigma, cond)
        net.enable_adapters()
        policy = fam.predict(x, sigma, cond)
    assert torch.equal(fam.predict(x, sigma, cond, reference=True), base)
    assert not torch.allclose(policy, base)


@pytest.mark.parametrize("extra,needle", [
    ({"lora.rank": 0, "model.quantize_base": "int8"}, "model.quantize_base=int8: a quantized frozen base is for LoRA"),
    ({"model.quantize_base": "int4"}, "model.quantize_base: 'int4' is not allowed; choose one of none, nf4, int8, fp8"),
])
def test_mixed_up_quantization_settings_are_one_line(extra, needle, tiny_flux, feedback, tmp_path):
    with pytest.raises(ConfigError) as err:
        _cfg(tiny_flux, feedback, tmp_path / "run", **extra)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_unet_family_refuses_a_quantized_base(tiny_sd, feedback, tmp_path):
    with pytest.raises(ConfigError) as err:
        DiffusionKTOTrainer(_cfg(tiny_sd, feedback, tmp_path / "run", **{"model.quantize_base": "int8"}))
    assert "model.quantize_base: applies to" in str(err.value) and "FluxPipeline" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; on CUDA the nf4 test below runs")
def test_nf4_without_cuda_is_refused_in_one_line(tiny_flux, feedback, tmp_path):
    with pytest.raises(ConfigError) as err:
        DiffusionKTOTrainer(_cfg(tiny_flux, feedback, tmp_path / "run", **{"model.quantize_base": "nf4"}))
    assert "model.quantize_base=nf4: bitsandbytes' 4-bit weights need a CUDA GPU" in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes nf4 needs a CUDA device")
def test_nf4_base_trains_its_lora_on_cuda(tiny_flux, feedback, tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = DiffusionKTOTrainer(_cfg(tiny_flux, feedback, tmp_path / "run", **{
        "model.quantize_base": "nf4", "train.mixed_precision": "bf16"}))
    net = trainer.family.trainable_module()
    assert quantized_linears(net) > 0
    lora = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    assert trainer.train().steps == 3
    params = dict(net.named_parameters())
    assert all(params[n].dtype == torch.float32 and not torch.equal(lora[n], params[n].detach()) for n in lora)
