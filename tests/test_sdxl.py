"""SDXL on a tiny random SDXL pipeline built from configs, saved and loaded through ``from_pretrained``: detection,
conditioning (both encoders, pooled, time ids of the crop actually made), LoRA and full training, the reference,
resume, the cache, baselines, sampling and evaluation through StableDiffusionXLPipeline, and model.vae."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny import logged_metrics, tiny_overrides, write_feedback
from diffusion_kto.config import ConfigError, load_config
from diffusion_kto.data.transforms import DrawChoices, crop_geometry, resize_shorter_side, transform_image
from diffusion_kto.models import FAMILIES, StableDiffusionXL, family_of, load_family
from diffusion_kto.models.sdxl import SDXLConditioning
from diffusion_kto.train import DiffusionKTOTrainer

SIZES = [(24, 16), (16, 20), (16, 16), (40, 18)]  # (width, height): crops and original sizes differ per image
# every kind of UNet module: attention, resnets, samplers, the time and added (pooled + time ids) embeddings, in / out
BROAD_TARGETS = "[to_q,to_k,to_v,to_out.0,conv1,conv2,time_emb_proj,conv_shortcut,proj_in,proj_out,ff.net.0.proj," \
                "ff.net.2,conv,conv_in,conv_out,linear_1,linear_2]"


@pytest.fixture
def xl_feedback(tmp_path):
    """8 rows of non-square images (4 liked, 4 disliked)."""
    return write_feedback(tmp_path / "xl-data", sizes=SIZES)


def _cfg(pipe, data, out, **extra):
    return load_config(None, tiny_overrides(pipe, data, out, **{"lora.rank": 4, **extra}))


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.fixture(scope="module")
def xl_run(tiny_sdxl, tmp_path_factory):
    """3 steps of LoRA KTO (alpha 8, rank 4, every kind of module) with a checkpoint; weights before and after."""
    root = tmp_path_factory.mktemp("xl_run")
    data = write_feedback(root / "data", sizes=SIZES)
    cfg = _cfg(tiny_sdxl, data, root / "run", **{"lora.alpha": 8, "lora.target_modules": BROAD_TARGETS,
                                                 "train.checkpoint_every": 3, "data.caption_dropout": 0.25})
    trainer = DiffusionKTOTrainer(cfg)
    fam = trainer.family
    frozen = {name: _params(getattr(fam, name)) for name in ("vae", "text_encoder", "text_encoder_2")}
    before = _params(fam.trainable_module())
    trainer.train()
    return SimpleNamespace(trainer=trainer, family=fam, before=before, frozen=frozen, out=root / "run", data=data)


def test_sdxl_is_detected_from_model_index(tiny_sdxl, tiny_sd):
    assert family_of(str(tiny_sdxl)) is StableDiffusionXL and FAMILIES["StableDiffusionXLPipeline"] is StableDiffusionXL
    assert family_of(str(tiny_sd)) is not StableDiffusionXL


def test_an_unsupported_pipeline_class_is_refused_naming_it(tiny_sdxl, xl_feedback, tmp_path):
    from test_cli import dkto

    other = tmp_path / "other"
    shutil.copytree(tiny_sdxl, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ConfigError, match="KandinskyV22Pipeline, which is not supported; supported pipeline classes: "
                                          "StableDiffusionPipeline, StableDiffusionXLPipeline"):
        load_family(_cfg(other, xl_feedback, tmp_path / "run"), weight_dtype=torch.float32, device="cpu")
    proc = dkto("train", *tiny_overrides(other, xl_feedback, tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("dkto train: error:")]
    assert "KandinskyV22Pipeline" in line and "StableDiffusionXLPipeline" in line


def test_conditioning_is_both_encoders_penultimate_states_and_the_pooled_projection(tiny_sdxl, xl_feedback, tmp_path):
    fam = load_family(_cfg(tiny_sdxl, xl_feedback, tmp_path / "r"), weight_dtype=torch.float32, device="cpu")
    prompts = ["a red circle", ""]
    cond = fam.encode_prompts(prompts)
    ids = [tok(prompts, padding="max_length", max_length=8, return_tensors="pt").input_ids
           for tok in (fam.tokenizer, fam.tokenizer_2)]
    one = fam.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
    two = fam.text_encoder_2(ids[1], output_hidden_states=True)
    assert cond.hidden_states.shape == (2, 8, 32) and cond.pooled.shape == (2, 16) and cond.time_ids is None
    assert torch.equal(cond.hidden_states[:1], torch.cat([one, two.hidden_states[-2]], dim=-1)[:1])
    assert torch.equal(cond.pooled[:1], two.text_embeds[:1])
    # the empty prompt (caption dropout) is SDXL's unconditional input: zeros, as its pipeline samples it
    assert not cond.hidden_states[1].any() and not cond.pooled[1].any()
    assert set(cond.tensors()) == {"hidden_states", "pooled"}  # the text part is what the cache stores


def test_mismatched_rolls_the_prompts_and_keeps_each_images_time_ids():
    states, pooled = torch.arange(3.0).view(3, 1, 1), torch.arange(3.0).view(3, 1) + 10
    time_ids = torch.tensor([[1, 1, 0, 0, 8, 8], [2, 2, 0, 0, 8, 8], [3, 3, 0, 0, 8, 8]])
    rolled = SDXLConditioning(states, pooled, time_ids).mismatched()
    assert rolled.hidden_states.flatten().tolist() == [2.0, 0.0, 1.0] and rolled.pooled.flatten().tolist() == [12, 10, 11]
    assert torch.equal(rolled.time_ids, time_ids)


@pytest.mark.parametrize("center, flip", [(True, False), (True, True), (False, False), (False, True)])
def test_time_ids_describe_the_crop_actually_made(center, flip):
    """The recorded box, cut from the resized (and mirrored) image, gives exactly the transformed pixels."""
    from PIL import Image

    width, height, res = 37, 23, 16
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    choices = DrawChoices(crop_x=0.83, crop_y=0.41, flip=flip, drop_caption=False)
    pixels = transform_image(image, res, choices, center_crop=center, random_flip=True)
    geometry = crop_geometry(image.size, res, choices, center_crop=center, random_flip=True)
    resized = resize_shorter_side(image, res)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left, h, w = geometry["crop"]
    expected = np.asarray(resized)[top:top + h, left:left + w]
    assert geometry["original_size"] == (23, 37) and (h, w) == (res, res)
    assert np.array_equal(((pixels.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy(), expected)
    if not center:
        assert 0 < left < resized.width - res  # a real, off-centre crop


def test_a_batch_conditions_on_each_images_size_and_crop(tiny_sdxl, xl_feedback, tmp_path):
    trainer = DiffusionKTOTrainer(_cfg(tiny_sdxl, xl_feedback, tmp_path / "run", **{"data.center_crop": False}))
    loader = trainer.loader()
    batch = next(iter(loader))
    cond = trainer.family.condition(trainer.family.encode_prompts(batch.prompts), batch)
    for row, draw, ids in zip(batch.rows.tolist(), batch.draw_ids.tolist(), cond.time_ids.tolist()):
        width, height = SIZES[row % len(SIZES)]
        item = loader.dataset[(row, draw)]
        assert ids[:2] == [height, width] and ids[2:4] == list(item["crop"][:2]) and ids[4:] == [16, 16]


def test_lora_kto_changes_every_lora_weight_and_no_frozen_one(xl_run):
    unet = xl_run.family.trainable_module()
    trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    changed = {n for n, p in unet.named_parameters() if not torch.equal(xl_run.before[n], p.detach())}
    assert trained and all("lora" in n for n in trained) and any("add_embedding" in n for n in trained)
    assert changed == trained
    for name, before in xl_run.frozen.items():
        assert all(torch.equal(before[n], p) for n, p in getattr(xl_run.family, name).named_parameters()), name
    assert len(logged_metrics(xl_run.out / "metrics.jsonl")) == 3


def test_the_reference_is_exactly_the_base_unet(xl_run, tiny_sdxl):
    from diffusers import UNet2DConditionModel

    fam = xl_run.family
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet").eval()
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 70])
    cond = SDXLConditioning(torch.randn(2, 8, 32), torch.randn(2, 16), torch.tensor([[20, 30, 0, 2, 16, 16]] * 2))
    with torch.no_grad():
        expected = base(x, t, encoder_hidden_states=cond.hidden_states,
                        added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids}).sample
        policy = fam.predict(x, t, cond)
    assert torch.equal(fam.predict(x, t, cond, reference=True), expected)
    assert (policy - expected).abs().max() > 1e-4  # the trained adapters are on outside the reference


def test_resume_equals_uninterrupted(tiny_sdxl, xl_feedback, tmp_path):
    """4 straight steps == 2 steps + checkpoint + resume + 2 steps, bit for bit (random crops and flips on)."""
    common = {"train.checkpoint_every": 2, "data.center_crop": False, "data.caption_dropout": 0.25}
    DiffusionKTOTrainer(_cfg(tiny_sdxl, xl_feedback, tmp_path / "a", **common, **{"train.max_steps": 4})).train()
    DiffusionKTOTrainer(_cfg(tiny_sdxl, xl_feedback, tmp_path / "b", **common, **{"train.max_steps": 2})).train()
    DiffusionKTOTrainer(_cfg(tiny_sdxl, xl_feedback, tmp_path / "b", **common, **{
        "train.max_steps": 4, "train.resume": "latest"})).train()
    a, b = (load_file(str(tmp_path / run / "pytorch_lora_weights.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (logged_metrics(tmp_path / run / "metrics.jsonl") for run in ("a", "b"))
    assert la[2:] == lb[2:]


def test_cached_training_equals_uncached(tiny_sdxl, xl_feedback, tmp_path):
    """The cache holds latents, both encoders' states, the pooled embedding and each image's size and crop per flip."""
    from test_cache import ATOL, LOSS_ATOL

    from diffusion_kto.data.cache import LatentCache, image_hash
    from diffusion_kto.train.precompute import build_cache

    extra = {"data.random_flip": True, "data.caption_dropout": 0.5}
    build_cache(_cfg(tiny_sdxl, xl_feedback, tmp_path / "unused", **extra), tmp_path / "cache", progress=None)
    cache = LatentCache(tmp_path / "cache")
    runs = {}
    for name, more in (("plain", {}), ("cached", {"data.cache": str(tmp_path / "cache")})):
        trainer = DiffusionKTOTrainer(_cfg(tiny_sdxl, xl_feedback, tmp_path / name, **extra, **more))
        trainer.train()
        runs[name] = trainer
    assert runs["cached"].family.text_encoder is None and runs["cached"].family.text_encoder_2 is None
    assert set(cache.text([""])) == {"hidden_states", "pooled"} and not cache.text([""])["pooled"].any()
    plain, from_cache = runs["plain"].loader().dataset, runs["cached"].loader().dataset
    for row in range(len(plain)):
        for draw in range(4):  # the cached geometry of each draw's flip variant is the transform's
            fresh, cached = plain[(row, draw)], from_cache[(row, draw)]
            assert (fresh["original_size"], fresh["crop"]) == (cached["original_size"], cached["crop"])
    assert image_hash(plain.rows[0]) in cache.images
    a, b = (load_file(str(tmp_path / n / "pytorch_lora_weights.safetensors")) for n in ("plain", "cached"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= ATOL
    la, lb = (logged_metrics(tmp_path / n / "metrics.jsonl") for n in ("plain", "cached"))
    assert all(abs(x["loss"] - y["loss"]) <= LOSS_ATOL for x, y in zip(la, lb))


def _paired_feedback(folder):
    """Two prompts, each with 2 liked and 2 disliked images of several sizes (pairs for DPO)."""
    data = write_feedback(folder, sizes=SIZES)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "prompt": "a red circle" if i < 4 else "a blue square"}) + "\n"
                            for i, r in enumerate(rows)))
    return data


@pytest.mark.parametrize("name, rank", [("sft", 2), ("csft", 2), ("dpo", 2), ("kto", 0)])
def test_baselines_and_full_fine_tune_train(tiny_sdxl, tmp_path, name, rank):
    cfg = _cfg(tiny_sdxl, _paired_feedback(tmp_path / "d"), tmp_path / "run", **{
        "loss.name": name, "lora.rank": rank, "train.batch_size": 2, "train.max_steps": 2})
    trainer = DiffusionKTOTrainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.family.trainable_module().named_parameters() if p.requires_grad}
    assert trainer.train().steps == 2
    after = dict(trainer.family.trainable_module().named_parameters())
    assert sum(not torch.equal(before[n], after[n]) for n in before) > 0.9 * len(before)
    assert (tmp_path / "run" / ("unet" if rank == 0 else "pytorch_lora_weights.safetensors")).exists()


def test_bf16_gradient_checkpointing_and_validation_images(tiny_sdxl, xl_feedback, tmp_path):
    from PIL import Image

    cfg = _cfg(tiny_sdxl, xl_feedback, tmp_path / "run", **{
        "train.max_steps": 1, "train.mixed_precision": "bf16", "train.gradient_checkpointing": True,
        "log.validation_every": 1, "log.validation_prompts": "[a red circle, a blue square]", "log.validation_steps": 2})
    trainer = DiffusionKTOTrainer(cfg)
    fam = trainer.family
    assert {fam.vae.dtype, fam.text_encoder.dtype, fam.text_encoder_2.dtype} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in fam.trainable_parameters())
    assert unwrap_unet(fam).is_gradient_checkpointing
    trainer.train()
    grid = Image.open(tmp_path / "run" / "validation" / "step-00000001.png")
    assert grid.width > 2 * 16 and grid.height > 2 * 16  # reference and policy rows through StableDiffusionXLPipeline
    # fp16 keeps a VAE whose config asks for it (SDXL's) in fp32; an fp16-safe VAE runs in fp16
    assert fam.vae_dtype({"force_upcast": True}, torch.float16) == torch.float32
    assert fam.vae_dtype({"force_upcast": False}, torch.float16) == torch.float16


def unwrap_unet(fam):
    from diffusion_kto.models import unwrap

    return unwrap(fam.trainable_module())


def test_eight_bit_adam_is_refused_off_cuda_in_one_line(tiny_sdxl, xl_feedback, tmp_path):
    with pytest.raises(ConfigError, match="optim.use_8bit_adam=true: bitsandbytes' 8-bit AdamW runs on CUDA GPUs"):
        DiffusionKTOTrainer(_cfg(tiny_sdxl, xl_feedback, tmp_path / "run", **{"optim.use_8bit_adam": True}))


def test_a_separate_vae_is_used_and_a_missing_one_is_one_line(tiny_sdxl, xl_feedback, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl / "vae")
    vae.register_to_config(scaling_factor=0.5, force_upcast=False)
    vae.save_pretrained(tmp_path / "my-vae")
    fam = load_family(_cfg(tiny_sdxl, xl_feedback, tmp_path / "r", **{"model.vae": str(tmp_path / "my-vae")}),
                      weight_dtype=torch.float32, device="cpu", with_reference=False)
    assert fam.latent_scale == 0.5 and fam.vae.config.force_upcast is False
    with pytest.raises(ConfigError, match=r"^model.vae: './no-vae' was read as a local folder"):
        load_family(_cfg(tiny_sdxl, xl_feedback, tmp_path / "r", **{"model.vae": "./no-vae"}),
                    weight_dtype=torch.float32, device="cpu")


def test_dkto_sample_and_eval_go_through_the_sdxl_pipeline(xl_run, tiny_sdxl, tmp_path):
    from test_cli import dkto

    from diffusion_kto.sampling import load_pipeline

    assert type(load_pipeline(str(tiny_sdxl), lora=str(xl_run.out), device="cpu")).__name__ == "StableDiffusionXLPipeline"
    proc = dkto("sample", "--model", str(tiny_sdxl), "--lora", str(xl_run.out), "--prompt", "a red circle", "--steps",
                "2", "--resolution", "16", "--out", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "s").glob("*.png"))) == 1
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    from diffusion_kto.cli import main

    assert main(["eval", "--models", f"aligned={tiny_sdxl}+lora:{xl_run.out}", f"base={tiny_sdxl}", "--prompts",
                 str(tmp_path / "prompts.txt"), "--metrics", "toy:preference", "--images-per-prompt", "1", "--steps",
                 "2", "--resolution", "16", "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {"aligned", "base"} <= set(results["models"])
