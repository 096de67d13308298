"""The SD3 and FLUX.1 families on tiny pipelines built from configs: what trains, the reference, resume, the cache,
exports that the diffusers pipelines load, the objectives, and the settings they refuse."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny import logged_metrics, tiny_overrides
from diffusion_kto import flow
from diffusion_kto.config import ConfigError, load_config
from diffusion_kto.models import load_family
from diffusion_kto.models.flux import image_ids, pack, unpack
from diffusion_kto.train import DiffusionKTOTrainer
from diffusion_kto.train.precompute import build_cache

FAMILIES = ["tiny_sd3", "tiny_flux", "tiny_chroma", "tiny_z_image", "tiny_qwen_image", "tiny_flux2",
            "tiny_flux2_klein"]  # family-agnostic: every flow family's tiny pipeline fixture


def _cfg(pipe, data, out, **extra):
    return load_config(None, tiny_overrides(pipe, data, out, **extra))


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def _frozen_parts(fam):
    return {"vae": fam.vae, **{n: m for n, m in fam.text.items() if isinstance(m, torch.nn.Module)}}


@pytest.mark.parametrize("pipe", FAMILIES)
def test_lora_trains_every_adapter_weight_and_nothing_else(pipe, feedback, tmp_path, request):
    trainer = DiffusionKTOTrainer(_cfg(request.getfixturevalue(pipe), feedback, tmp_path / "run", **{"lora.rank": 4}))
    fam = trainer.family
    net = fam.trainable_module()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    frozen = {name: _snapshot(m) for name, m in _frozen_parts(fam).items()}
    assert set(frozen) >= {"vae", "text_encoder"}
    trainer.train()
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    changed = {n for n, p in net.named_parameters() if not torch.equal(before[n], p.detach())}
    assert trained and all("lora" in n for n in trained) and any("to_q" in n for n in trained)
    assert changed == trained  # every trainable weight changed, no frozen one did
    assert not any(_changed(frozen[name], m) for name, m in _frozen_parts(fam).items())
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("pipe", FAMILIES)
def _live_parameters(fam):
    """The transformer weights the prediction depends on: a nonzero gradient of its output (the last block's text
    stream of Qwen-Image, which nothing reads, has none)."""
    import copy

    net = copy.deepcopy(fam.transformer)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = fam.encode_images(pixels, torch.randn)
    fam.forward(net, x, torch.tensor([0.3, 0.8]), fam.encode_prompts(["a red circle", "a blue square"])).square().sum(
        ).backward()
    return {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("pipe", FAMILIES)
def test_full_finetune_changes_every_transformer_weight_and_not_the_reference(pipe, feedback, tmp_path, request):
    trainer = DiffusionKTOTrainer(_cfg(request.getfixturevalue(pipe), feedback, tmp_path / "run"))
    fam = trainer.family
    live = _live_parameters(fam)
    names = {n for n, _ in fam.transformer.named_parameters()}
    assert len(live) >= 0.75 * len(names)  # only weights no output depends on are left out (9 of 45 for Qwen-Image)
    before, ref_before = _snapshot(fam.transformer), _snapshot(fam.ref_transformer)
    trainer.train()
    assert _changed(before, fam.transformer) >= live
    assert not _changed(ref_before, fam.ref_transformer)
    assert (tmp_path / "run" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("pipe", FAMILIES)
def test_reference_is_exactly_the_base_model(pipe, feedback, tmp_path, request):
    folder = request.getfixturevalue(pipe)
    trainer = DiffusionKTOTrainer(_cfg(folder, feedback, tmp_path / "run", **{"lora.rank": 4, "optim.lr": 1e-2}))
    trainer.train()
    fam = trainer.family
    base = type(fam.transformer).from_pretrained(folder, subfolder="transformer").eval()
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = torch.randn(fam.encode_images(pixels, torch.zeros).shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8])
    cond = fam.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        expected = fam.forward(base, x, sigma, cond)
        policy = fam.predict(x, sigma, cond)
    assert torch.equal(fam.predict(x, sigma, cond, reference=True), expected)
    assert not torch.allclose(policy, expected)  # the adapters did learn something


@pytest.mark.parametrize("pipe", FAMILIES)
def test_resume_equals_uninterrupted(pipe, feedback, tmp_path, request):
    folder = request.getfixturevalue(pipe)
    common = {"lora.rank": 4, "train.checkpoint_every": 2}
    DiffusionKTOTrainer(_cfg(folder, feedback, tmp_path / "a", **common, **{"train.max_steps": 4})).train()
    DiffusionKTOTrainer(_cfg(folder, feedback, tmp_path / "b", **common, **{"train.max_steps": 2})).train()
    DiffusionKTOTrainer(_cfg(folder, feedback, tmp_path / "b", **common,
                             **{"train.max_steps": 4, "train.resume": "latest"})).train()
    a, b = (load_file(str(tmp_path / r / "pytorch_lora_weights.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_metrics(tmp_path / "a" / "metrics.jsonl")[2:] == logged_metrics(tmp_path / "b" / "metrics.jsonl")[2:]


@pytest.mark.parametrize("pipe", FAMILIES)
def test_cached_training_equals_uncached(pipe, feedback, tmp_path, request):
    """Latents and every text embedding (T5 included) come from the cache; same losses and weights."""
    folder = request.getfixturevalue(pipe)
    extra = {"lora.rank": 4, "data.caption_dropout": 0.5}
    build_cache(_cfg(folder, feedback, tmp_path / "u", **extra), tmp_path / "cache", shard_size=3, progress=None)
    runs = {}
    for name, more in (("plain", {}), ("cached", {"data.cache": str(tmp_path / "cache")})):
        runs[name] = DiffusionKTOTrainer(_cfg(folder, feedback, tmp_path / name, **extra, **more))
        runs[name].train()
    cached = runs["cached"].family
    assert cached.vae is None and all(m is None for n, m in cached.text.items() if n.startswith("text_encoder"))
    a, b = (load_file(str(tmp_path / r / "pytorch_lora_weights.safetensors")) for r in ("plain", "cached"))
    # the encoders batch their work differently (the whole cache at once, or a step's images), which moves the last
    # bits of latents and embeddings; Adam's first steps normalise a gradient near zero, so one of the 64 LoRA
    # weights of the SD3 run was seen 3.5e-6 apart after 3 steps (the rest within 1e-6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
    la, lb = (logged_metrics(tmp_path / r / "metrics.jsonl") for r in ("plain", "cached"))
    assert [x["loss"] for x in la] == pytest.approx([x["loss"] for x in lb], abs=2.5e-5)


def _image(pipeline):
    from diffusion_kto.models import call_options

    pipeline.set_progress_bar_config(disable=True)
    return pipeline(prompt="a red circle", generator=torch.Generator().manual_seed(0), height=16, width=16,
                    num_inference_steps=3, output_type="np", **call_options(pipeline)).images


@pytest.mark.parametrize("pipe", FAMILIES)
def test_lora_export_loads_in_the_diffusers_pipeline_and_draws_the_trained_image(pipe, feedback, tmp_path, request):
    """StableDiffusion3Pipeline / FluxPipeline.load_lora_weights on the export changes a fixed-seed image into exactly
    the trained policy's (alpha != rank: the scale travels in the file's adapter metadata)."""
    import diffusers

    folder = request.getfixturevalue(pipe)
    trainer = DiffusionKTOTrainer(_cfg(folder, feedback, tmp_path / "run", **{"lora.rank": 4, "lora.alpha": 8,
                                                                              "optim.lr": 1e-2}))
    trainer.train()
    cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    before = _image(cls.from_pretrained(folder))
    loaded = cls.from_pretrained(folder)
    loaded.load_lora_weights(tmp_path / "run")
    with trainer.family.pipeline() as policy:
        trained = _image(policy)
    after = _image(loaded)
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, trained, atol=1e-5)


@pytest.mark.parametrize("pipe", FAMILIES)
def test_dkto_export_writes_files_the_pipelines_load_to_the_trained_image(pipe, feedback, tmp_path, request, capsys):
    """`dkto export` on a flow run: the diffusers file (every family) and the kohya file (FLUX.1, Black Forest
    Labs' names) load through the pipeline to the trained policy's image; a family with no kohya naming that
    diffusers loads back (SD3, ...) has that export refused in one line, and nothing is written."""
    import diffusers

    from diffusion_kto.cli import main
    from diffusion_kto.models import family_of

    folder = request.getfixturevalue(pipe)
    extra = {"lora.rank": 4, "lora.alpha": 8, "optim.lr": 1e-2}
    if family_of(str(folder)).kohya_layout == "bfl":  # FLUX.1's double blocks only (see the test below)
        extra["lora.target_modules"] = "[add_q_proj, add_k_proj, add_v_proj, to_out.0, to_add_out]"
    trainer = DiffusionKTOTrainer(_cfg(folder, feedback, tmp_path / "run", **extra))
    trainer.train()
    with trainer.family.pipeline() as policy:
        trained = _image(policy)
    cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    for fmt in ("diffusers", "kohya"):
        out = tmp_path / f"{fmt}.safetensors"
        capsys.readouterr()
        code = main(["export", str(tmp_path / "run"), "--format", fmt, "--out", str(out)])
        if fmt == "kohya" and not trainer.family.kohya_layout:
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and not out.exists() and f"--format kohya: a {cls.__name__} LoRA" in line
            continue
        assert code == 0
        loaded = cls.from_pretrained(folder)
        loaded.load_lora_weights(str(out))
        np.testing.assert_allclose(_image(loaded), trained, atol=1e-5)


def test_flux_kohya_names_fuse_qkv_and_load_back_to_the_trained_image(tiny_flux, feedback, tmp_path):
    """kohya (BFL) keys: the text q, k, v LoRAs become one block-diagonal txt_attn_qkv; diffusers' kohya Flux loader
    splits it back, and the pipeline draws the trained policy's image. (Its loader assumes FLUX.1's width 3072 for a
    single block's linear1, so the tiny model's LoRA stays in the double blocks here; names below.)"""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    from diffusion_kto.models.flux_kohya import bfl_name, to_bfl_kohya

    targets = "[add_q_proj, add_k_proj, add_v_proj, to_out.0, to_add_out, ff.net.2, norm1.linear]"
    trainer = DiffusionKTOTrainer(_cfg(tiny_flux, feedback, tmp_path / "run", **{
        "lora.rank": 4, "lora.alpha": 8, "optim.lr": 1e-2, "lora.target_modules": targets}))
    trainer.train()
    kohya = to_bfl_kohya(trainer.family.trainable_state(), 8.0, dict(trainer.family.transformer_config))
    qkv = "lora_unet_double_blocks_0_txt_attn_qkv"
    assert kohya[qkv + ".lora_down.weight"].shape == (12, 16) and kohya[qkv + ".lora_up.weight"].shape == (48, 12)
    assert float(kohya[qkv + ".alpha"]) == 24.0 and float(kohya["lora_unet_double_blocks_0_txt_attn_proj.alpha"]) == 8
    assert not kohya[qkv + ".lora_up.weight"][:16, 4:].any()  # block-diagonal: q's rows see only q's rank
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    loaded = FluxPipeline.from_pretrained(tiny_flux)
    loaded.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    with trainer.family.pipeline() as policy:
        np.testing.assert_allclose(_image(loaded), _image(policy), atol=1e-5)
    assert bfl_name("single_transformer_blocks.7.proj_mlp") == ("lora_unet_single_blocks_7_linear1", 3)
    assert bfl_name("single_transformer_blocks.7.attn.to_k") == ("lora_unet_single_blocks_7_linear1", 1)
    assert bfl_name("transformer_blocks.2.attn.to_v") == ("lora_unet_double_blocks_2_img_attn_qkv", 2)
    with pytest.raises(ValueError, match="norm_out"):
        bfl_name("norm_out.linear")


def test_sd3_without_t5_trains_with_zeros_in_its_place(tiny_sd3, feedback, tmp_path):
    trainer = DiffusionKTOTrainer(_cfg(tiny_sd3, feedback, tmp_path / "run", **{"lora.rank": 2, "model.drop_t5": True}))
    fam = trainer.family
    assert fam.text["text_encoder_3"] is None and fam.text["text_encoder"] is not None
    cond = fam.encode_prompts(["a red circle"])
    assert cond.prompt_embeds.shape == (1, 8 + 8, 32) and not cond.prompt_embeds[:, 8:].any()
    assert trainer.train().steps == 3


def test_flux_packing_ids_and_resolution_shift(tiny_flux, feedback, tmp_path):
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    tokens = pack(x)  # (2, 4 tokens, 16): token (row, col) holds the 4 channels' 2x2 patches, channel-major
    assert tokens.shape == (2, 4, 16) and tokens[0, 1, :4].tolist() == [2.0, 3.0, 6.0, 7.0]
    assert torch.equal(unpack(tokens, 4, 4), x)
    assert image_ids(4, 4, "cpu", torch.float32).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]
    fam = load_family(_cfg(tiny_flux, feedback, tmp_path / "r", **{"lora.rank": 2}), weight_dtype=torch.float32,
                      device="cpu")
    assert fam.sigma_shift() == pytest.approx(flow.resolution_shift(16))  # 16 px / VAE 2 / packing 2 = 4 x 4 tokens
    assert fam.guidance and fam.guidance_scale == 3.5


@pytest.mark.parametrize("pipe", FAMILIES)
@pytest.mark.parametrize("name", ["sft", "dpo", "csft", "kto_paired", "bco", "nft"])
def test_objectives_train(pipe, name, tmp_path, request):
    """Every objective besides KTO (the tests above) through the same trainer on every flow family: SFT, Flow-DPO
    (Diffusion-DPO on velocity errors), CSFT, KTO with pairs, BCO and NFT (raw predictions)."""
    from tiny import write_feedback

    data = write_feedback(tmp_path / "d")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "prompt": "a red circle" if i < 4 else "a blue square"}) + "\n"
                            for i, r in enumerate(rows)))
    cfg = _cfg(request.getfixturevalue(pipe), data, tmp_path / "run", **{"loss.name": name, "lora.rank": 2,
                                                                          "train.batch_size": 2, "train.max_steps": 1})
    trainer = DiffusionKTOTrainer(cfg)
    lora = {n: p.detach().clone() for n, p in trainer.family.transformer.named_parameters() if p.requires_grad}
    assert trainer.train().steps == 1
    assert all(not torch.equal(lora[n], p) for n, p in trainer.family.transformer.named_parameters() if p.requires_grad)


def test_flow_loss_weighting_and_sigma_law_are_used(tiny_sd3, feedback, tmp_path):
    fam = load_family(_cfg(tiny_sd3, feedback, tmp_path / "r", **{"lora.rank": 2, "flow.weighting": "cosmap",
                                                                   "flow.timesteps": "uniform", "flow.shift": 2.0}),
                      weight_dtype=torch.float32, device="cpu")
    sigma = fam.timesteps(0, torch.tensor([0, 1]), 1)
    torch.testing.assert_close(sigma, flow.shift(flow.draw("uniform", 0, torch.tensor([0, 1]), 1), 2.0))
    noised = fam.noisy(torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8), sigma)
    torch.testing.assert_close(noised.weight, flow.cosmap_density(sigma))
    assert torch.equal(noised.target, torch.ones(2, 4, 8, 8))


def test_sd3_uses_its_scheduler_shift_by_default(tiny_sd3, feedback, tmp_path):
    fam = load_family(_cfg(tiny_sd3, feedback, tmp_path / "r", **{"lora.rank": 2}), weight_dtype=torch.float32,
                      device="cpu")
    assert fam.sigma_shift() == 3.0 and fam.t5_tokens == 8


@pytest.mark.parametrize("pipe,extra,needle", [
    ("tiny_flux", {"model.drop_t5": True}, "model.drop_t5: FLUX.1 needs T5"),
    ("tiny_sd3", {"model.guidance_scale": 3.0}, "model.guidance_scale: applies to FluxPipeline"),
    ("tiny_sd", {"flow.weighting": "cosmap"}, "flow.weighting: applies to StableDiffusion3Pipeline, FluxPipeline"),
    ("tiny_sd", {"model.drop_t5": True}, "model.drop_t5: applies to StableDiffusion3Pipeline models only"),
    ("tiny_sd3", {"lora.rank": 2, "lora.target_modules": "[conv_in]"}, "lora.target_modules: ['conv_in'] match no"),
    ("tiny_sd3", {"data.resolution": 18}, "data.resolution: 18 is not a multiple of 4"),
    ("tiny_sd", {"lora.rank": 2, "lora.target_modules": "[nope]"}, "lora.target_modules: ['nope'] match no layer"),
    ("tiny_sd3", {"model.vae": "some/vae"}, "model.vae: applies to StableDiffusionPipeline, StableDiffusionXLPipeline"),
])
def test_settings_a_family_cannot_use_are_refused_naming_the_key(pipe, extra, needle, feedback, tmp_path, request):
    with pytest.raises(ConfigError) as err:
        DiffusionKTOTrainer(_cfg(request.getfixturevalue(pipe), feedback, tmp_path / "run", **extra))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_t5_and_schnell_guidance_are_refused(feedback, tmp_path):
    from tiny_flow import build_tiny_flux, build_tiny_sd3

    no_t5 = build_tiny_sd3(tmp_path / "no_t5", t5=False)
    with pytest.raises(ConfigError, match=r"model.drop_t5: .* has no T5 encoder \(text_encoder_3\); set model.drop_t5=true"):
        DiffusionKTOTrainer(_cfg(no_t5, feedback, tmp_path / "a"))
    assert DiffusionKTOTrainer(_cfg(no_t5, feedback, tmp_path / "b", **{"model.drop_t5": True,
                                                                        "train.max_steps": 1})).train().steps == 1
    schnell = build_tiny_flux(tmp_path / "schnell", guidance=False)
    with pytest.raises(ConfigError, match="model.guidance_scale: .* has no guidance embedding"):
        DiffusionKTOTrainer(_cfg(schnell, feedback, tmp_path / "c", **{"model.guidance_scale": 3.5}))


@pytest.mark.parametrize("bad,match", [
    ({"flow.mode_scale": 2.0}, "flow.mode_scale: must be in"),
    ({"flow.shift": 0}, "flow.shift: must be > 0"),
    ({"flow.weighting": "snr"}, "flow.weighting: 'snr' is not allowed"),
    ({"flow.timesteps": "cosmap"}, "flow.timesteps: 'cosmap' is not allowed"),
])
def test_flow_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"{k}={v}" for k, v in bad.items()])


def test_a_cache_built_with_t5_is_refused_without_it(tiny_sd3, feedback, tmp_path):
    from diffusion_kto.data.cache import CacheError

    build_cache(_cfg(tiny_sd3, feedback, tmp_path / "u", **{"lora.rank": 2}), tmp_path / "cache", progress=None)
    with pytest.raises(CacheError, match="'text_encoder'"):
        DiffusionKTOTrainer(_cfg(tiny_sd3, feedback, tmp_path / "run", **{
            "lora.rank": 2, "model.drop_t5": True, "data.cache": str(tmp_path / "cache")}))


def test_full_finetune_export_samples_through_load_pipeline_and_the_cli(tiny_sd3, feedback, tmp_path):
    from test_cli import dkto

    from diffusion_kto.sampling import generate, load_pipeline

    DiffusionKTOTrainer(_cfg(tiny_sd3, feedback, tmp_path / "run", **{"optim.lr": 1e-2, "train.max_steps": 2})).train()
    base, tuned = load_pipeline(str(tiny_sd3), device="cpu"), load_pipeline(str(tiny_sd3), unet=str(tmp_path / "run"),
                                                                             device="cpu")
    assert type(base.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    a, b = (np.asarray(generate(p, ["a red circle"], [0], steps=2, guidance=2.0, resolution=16)[0]) for p in (base, tuned))
    assert not np.array_equal(a, b)
    proc = dkto("sample", "--model", str(tiny_sd3), "--unet", str(tmp_path / "run"), "--prompt", "a red circle",
                "--steps", "2", "--resolution", "16", "--out", str(tmp_path / "samples"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_dkto_eval_compares_a_flux_lora_with_its_base(tiny_flux, feedback, tmp_path):
    from diffusion_kto.cli import main

    DiffusionKTOTrainer(_cfg(tiny_flux, feedback, tmp_path / "run", **{"lora.rank": 4, "optim.lr": 1e-2})).train()
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    args = ["eval", "--models", f"aligned={tiny_flux}+lora:{tmp_path / 'run'}", f"base={tiny_flux}", "--prompts",
            str(tmp_path / "prompts.txt"), "--metrics", "toy:preference", "--images-per-prompt", "2", "--steps", "2",
            "--resolution", "16", "--device", "cpu", "--out", str(tmp_path / "eval")]
    assert main(args) == 0
    assert (tmp_path / "eval" / "report.md").is_file()
