"""Mixed-precision training on a CUDA device: fp16 and bf16, LoRA and full fine-tune (skipped without a GPU).

On CPU the rest of the suite covers the maths; these check what only a GPU exercises: autocast with a gradient
scaler (fp16), fp32 master weights beside half-precision frozen parts, and exports that load and sample on CUDA."""
import pytest
import torch

from tiny import tiny_overrides
from diffusion_kto.config import load_config
from diffusion_kto.train import DiffusionKTOTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_mixed_precision_trains_every_trainable_weight_in_fp32_on_cuda(tiny_sd, feedback, tmp_path, precision, rank):
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "run", **{
        "lora.rank": rank, "train.max_steps": 3, "train.mixed_precision": precision}))
    trainer = DiffusionKTOTrainer(cfg)
    fam = trainer.family
    assert trainer.accelerator.device.type == "cuda"
    assert fam.vae.dtype == DTYPE[precision] and fam.text_encoder.dtype == DTYPE[precision]
    trainable = dict(fam.trainable_module().named_parameters())
    trained = {n for n, p in trainable.items() if p.requires_grad}
    assert trained and all(trainable[n].dtype == torch.float32 and trainable[n].is_cuda for n in trained)
    frozen = {n: p.detach().clone() for n, p in trainable.items() if not p.requires_grad}
    before = {n: trainable[n].detach().clone() for n in trained}
    result = trainer.train()
    assert result.steps == 3 and result.skipped_steps == 0
    changed = {n for n in trained if not torch.equal(before[n], trainable[n].detach())}
    assert changed == trained  # every trainable weight moved, through the scaler / autocast
    assert all(torch.equal(p, trainable[n].detach()) for n, p in frozen.items())


@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_fp16_export_loads_and_samples_on_cuda(tiny_sd, feedback, tmp_path, rank):
    from diffusion_kto.sampling import load_pipeline

    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, out, **{
        "lora.rank": rank, "train.max_steps": 2, "train.mixed_precision": "fp16"}))
    DiffusionKTOTrainer(cfg).train()
    adapter = {"lora": str(out)} if rank else {"unet": str(out)}
    pipe = load_pipeline(str(tiny_sd), device="cuda", dtype=torch.float16, **adapter)
    images = pipe(["a red circle"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.as_tensor(images)).all()


def test_sdxl_fp16_keeps_its_vae_in_fp32_and_draws_validation_images_on_cuda(tiny_sdxl, tmp_path):
    """SDXL's VAE asks for fp32 (force_upcast): under fp16 it stays fp32 while the encoders run in fp16."""
    from tiny import write_feedback

    data = write_feedback(tmp_path / "d", sizes=[(24, 16), (16, 20)])
    cfg = load_config(None, tiny_overrides(tiny_sdxl, data, tmp_path / "run", **{
        "lora.rank": 4, "train.max_steps": 2, "train.mixed_precision": "fp16", "train.gradient_checkpointing": True,
        "log.validation_every": 2, "log.validation_prompts": "[a red circle]", "log.validation_steps": 2}))
    trainer = DiffusionKTOTrainer(cfg)
    fam = trainer.family
    assert fam.vae.dtype == torch.float32 and fam.text_encoder_2.dtype == torch.float16
    assert trainer.train().steps == 2
    assert (tmp_path / "run" / "validation" / "step-00000002.png").is_file()


def test_eight_bit_adam_trains_sdxl_lora_on_cuda(tiny_sdxl, feedback, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = load_config(None, tiny_overrides(tiny_sdxl, feedback, tmp_path / "run", **{
        "lora.rank": 4, "train.max_steps": 2, "train.mixed_precision": "bf16", "optim.use_8bit_adam": True}))
    trainer = DiffusionKTOTrainer(cfg)
    assert type(trainer.optimizer.optimizer).__name__ == "AdamW8bit"
    assert trainer.train().steps == 2
