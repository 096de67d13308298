"""LoRA files in diffusers and kohya keys (`dkto export`), for SD 1.x / 2.x and SDXL: the kohya names by hand, every
SDXL module through diffusers' own kohya loader, and on tiny trained models: the kohya file loaded by diffusers gives
the image of the diffusers file (every key consumed), which is the image of the trained family."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_cli import dkto
from tiny import tiny_overrides, write_feedback
from diffusion_kto.cli import main
from diffusion_kto.config import ConfigError, load_config
from diffusion_kto.models.lora_formats import LoraSource, peft_from_diffusers, sgm_module_name, to_kohya
from diffusion_kto.train import DiffusionKTOTrainer

SDXL = json.loads((Path(__file__).parent.parent / "benchmarks" / "sdxl_configs.json").read_text())
BROAD_TARGETS = "[to_q,to_k,to_v,to_out.0,conv1,conv2,time_emb_proj,conv_shortcut,proj_in,proj_out,ff.net.0.proj," \
                "ff.net.2,conv,conv_in,conv_out,linear_1,linear_2]"


@pytest.mark.parametrize("path, sgm", [  # SDXL base: 2 layers per block, up blocks 0 and 1 attend, block 2 does not
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0", "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("mid_block.resnets.0.time_emb_proj", "middle_block.0.emb_layers.1"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.attentions.2.transformer_blocks.3.ff.net.2", "output_blocks.2.1.transformer_blocks.3.ff.net.2"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
    ("conv_in", "input_blocks.0.0"), ("conv_out", "out.2"), ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
])
def test_sgm_names_by_hand(path, sgm):
    assert sgm_module_name(path, SDXL["unet"]) == sgm


def test_kohya_keys_alpha_and_unknown_modules():
    a, b = torch.ones(2, 5), torch.ones(7, 2)
    state = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
             "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b}
    sd = to_kohya(state, LoraSource(alpha=8, pipeline_class="StableDiffusionPipeline"))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert set(sd) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    assert sd[f"{name}.alpha"].dtype == torch.float32 and sd[f"{name}.alpha"].item() == 8.0
    xl = to_kohya(state, LoraSource(alpha=4, pipeline_class="StableDiffusionXLPipeline", kohya_layout="sgm",
                                    unet_config=SDXL["unet"]))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in xl
    with pytest.raises(ValueError, match="no kohya .LDM. name for the UNet module 'encoder_hid_proj'"):
        sgm_module_name("encoder_hid_proj", SDXL["unet"])


def test_every_sdxl_module_round_trips_through_diffusers_kohya_loader():
    """Each Linear / Conv of the real SDXL UNet (built on the meta device): kohya name -> diffusers' SDXL kohya
    conversion -> the same module path; nothing left over, nothing merged."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL["unet"])
    paths = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    tiny = torch.zeros(1, 1)
    state = {f"{n}{s}": tiny for n in paths for s in (".lora_A.weight", ".lora_B.weight")}
    kohya = to_kohya(state, LoraSource(alpha=1, pipeline_class="x", kohya_layout="sgm", unet_config=SDXL["unet"]))
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(kohya, unet_config=unet.config)
    back = {k.removeprefix("unet.").replace(".processor.", ".").replace("to_out_lora", "to_out.0.lora")
            .replace("_lora.down.weight", ".lora.down.weight").removesuffix(".lora.down.weight")
            for k in converted if k.endswith("down.weight")}
    assert len(converted) == 2 * len(paths) and len(alphas) == len(paths) == 794
    assert back == paths


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def lora_run(request, tmp_path_factory):
    """A 2-step LoRA KTO run (alpha 8, rank 4, every kind of UNet module) with a checkpoint, on a tiny SD or SDXL."""
    pipe = request.getfixturevalue("tiny_sd" if request.param == "sd" else "tiny_sdxl")
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    data = write_feedback(root / "data")
    cfg = load_config(None, tiny_overrides(pipe, data, root / "run", **{
        "lora.rank": 4, "lora.alpha": 8, "lora.target_modules": BROAD_TARGETS, "optim.lr": 1e-2,
        "train.max_steps": 2, "train.checkpoint_every": 2}))
    trainer = DiffusionKTOTrainer(cfg)
    trainer.train()
    with trainer.family.pipeline() as family_pipe:
        trained = _image(family_pipe)
    return pipe, root / "run", trained


def _image(pipe):
    """A fixed-seed 16 px image as a tensor."""
    return pipe(prompt="a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), height=16,
                width=16, output_type="pt").images


def _loaded_image(base, lora_file):
    """The image of the base pipeline (its family's diffusers class) with a LoRA file loaded by diffusers."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    from diffusion_kto.models import family_of

    pipe = DiffusionPipeline.from_pretrained(base, **family_of(str(base)).pipeline_kwargs)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
    return _image(pipe), pipe


def test_kohya_and_diffusers_exports_load_into_the_trained_image(lora_run, tmp_path):
    base, run, trained = lora_run
    proc = dkto("export", str(run), "--format", "kohya", "--out", str(tmp_path / "kohya.safetensors"))  # the console
    assert proc.returncode == 0 and "ComfyUI" in proc.stdout, proc.stderr[-2000:]
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "diffusers.safetensors")]) == 0
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    assert kohya and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                         for k in kohya)
    untouched, _ = _loaded_image(base, None)
    from_run, _ = _loaded_image(base, run / "pytorch_lora_weights.safetensors")
    from_diffusers, _ = _loaded_image(base, tmp_path / "diffusers.safetensors")
    from_kohya, pipe = _loaded_image(base, tmp_path / "kohya.safetensors")
    assert (from_run - untouched).abs().max() > 1e-3  # the LoRA changes the fixed-seed image
    assert torch.equal(from_run, trained)  # alpha 8 / rank 4 is kept: the file's image is the trained family's
    assert torch.equal(from_diffusers, from_run) and torch.equal(from_kohya, from_run)
    # every kohya key was consumed: diffusers' conversion raises on leftovers, and each module's down, up and alpha
    # became one adapter weight pair in the UNet with its scale
    kw = {"unet_config": pipe.unet.config} if "XL" in type(pipe).__name__ else {}
    converted, alphas = type(pipe).lora_state_dict(str(tmp_path / "kohya.safetensors"), **kw)
    adapters = [n for n, _ in pipe.unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    assert len(converted) == len(adapters) == 2 * len(alphas) and 3 * len(alphas) == len(kohya)


def test_a_checkpoint_exports_the_same_lora(lora_run, tmp_path):
    base, run, _ = lora_run
    (checkpoint,) = sorted((run / "checkpoints").iterdir())
    for source, out in ((run, "run.safetensors"), (checkpoint, "ckpt.safetensors")):
        assert main(["export", str(source), "--format", "kohya", "--out", str(tmp_path / out)]) == 0
    a, b = load_file(str(tmp_path / "run.safetensors")), load_file(str(tmp_path / "ckpt.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(tmp_path / "ckpt.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_network_dim"] == "4" and fh.metadata()["ss_network_alpha"] == "8.0"


def test_diffusers_file_round_trips_to_peft_names(lora_run):
    _, run, _ = lora_run
    (checkpoint,) = sorted((run / "checkpoints").iterdir())
    peft = load_file(str(checkpoint / "weights.safetensors"))
    back = peft_from_diffusers(load_file(str(run / "pytorch_lora_weights.safetensors")))
    assert back.keys() == peft.keys() and all(torch.equal(back[k], peft[k]) for k in peft)


def test_refusals_are_one_line(tiny_sd, feedback, tmp_path, capsys):
    from diffusion_kto.apps.export import export_lora

    full = tmp_path / "full"
    DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, feedback, full, **{"train.max_steps": 1}))).train()
    capsys.readouterr()
    assert main(["export", str(full), "--format", "kohya", "--out", str(tmp_path / "x.safetensors")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("dkto export: error: ") and "a full fine-tune: there is no LoRA to export" in line
    assert not (tmp_path / "x.safetensors").exists()
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="never overwrites"):
        export_lora(full, "kohya", taken)
    assert taken.read_bytes() == b"keep me"
    with pytest.raises(ConfigError, match="must end in .safetensors"):
        export_lora(full, "kohya", tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="neither config.yaml"):
        export_lora(tmp_path, "kohya", tmp_path / "y.safetensors")
