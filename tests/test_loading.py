"""Loading models: one rule for folder or hub id, one line when a model cannot be found, safetensors only unless the
user allows pickles, and no torchvision-fallback notice on a newcomer's first screen."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from diffusion_kto.config import ConfigError, load_config
from diffusion_kto.models import load_family
from diffusion_kto.models.loading import is_hub_id, locate
from diffusion_kto.sampling import load_pipeline
from tiny import tiny_overrides


def _run(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "diffusion_kto.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_folder_or_hub_id():
    assert is_hub_id("owner/name") and is_hub_id("name") and is_hub_id("stabilityai/sdxl-base-1.0")
    assert not is_hub_id("./nope") and not is_hub_id("/abs/missing") and not is_hub_id("a/b/c")
    assert not is_hub_id("~/models/x") and not is_hub_id(".hidden")


@pytest.mark.parametrize("name, read_as", [("./nope", "a local folder"), ("does/not-exist", "a hub id")])
def test_a_model_that_cannot_be_found_is_one_line(tmp_path, feedback, name, read_as):
    proc = _run("train", "--config", "configs/toy-kto.yaml", f"model.pretrained={name}", f"data.path={feedback}",
                f"train.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("dkto train: error:")]
    assert f"model.pretrained: {name!r} was read as {read_as}" in line
    proc = _run("sample", "--model", name, "--prompt", "a red circle", "--out", str(tmp_path / "s"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and f"--model: {name!r} was read as {read_as}" in proc.stderr


def test_a_folder_that_is_not_a_pipeline_and_an_unsupported_class(tmp_path):
    with pytest.raises(ConfigError, match="has no model_index.json"):
        locate(str(tmp_path), "model.pretrained")
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    cfg = load_config(None, [f"model.pretrained={tmp_path}"])
    with pytest.raises(ConfigError, match="KandinskyPipeline, which is not supported; supported pipeline classes: "
                                          "StableDiffusionPipeline"):
        load_family(cfg, weight_dtype=torch.float32, device="cpu")


@pytest.fixture
def pickled_sd(tiny_sd, tmp_path):
    """The tiny pipeline with its UNet weights saved as a pickled .bin file instead of safetensors."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_sd, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()
    return folder


def test_pickled_weights_need_the_users_consent(pickled_sd, feedback, tmp_path):
    cfg = load_config(None, tiny_overrides(pickled_sd, feedback, tmp_path / "run"))
    with pytest.raises(ConfigError, match="no safetensors weights.*model.allow_pickle=true"):
        load_family(cfg, weight_dtype=torch.float32, device="cpu")
    allowed = load_config(None, tiny_overrides(pickled_sd, feedback, tmp_path / "run", **{"model.allow_pickle": True}))
    assert load_family(allowed, weight_dtype=torch.float32, device="cpu").unet is not None
    with pytest.raises(ConfigError, match="no safetensors weights"):
        load_pipeline(str(pickled_sd), device="cpu")
    assert load_pipeline(str(pickled_sd), device="cpu", allow_pickle=True).unet is not None


def test_imagereward_with_a_local_checkpoint_never_asks_the_hub_for_its_config(tmp_path):
    from diffusion_kto.evaluation.reward_models import ScorerError, imagereward_med_config

    ckpt = tmp_path / "ImageReward.pt"
    ckpt.write_bytes(b"weights")
    with pytest.raises(ScorerError, match="needs its med_config.json"):
        imagereward_med_config(str(ckpt), None)
    (tmp_path / "med_config.json").write_text("{}")
    assert imagereward_med_config(str(ckpt), None) == str(tmp_path / "med_config.json")
    assert imagereward_med_config("ImageReward-v1.0", None) is None  # the hub model: the package fetches both
    with pytest.raises(ScorerError, match="is not a file"):
        imagereward_med_config(str(ckpt), str(tmp_path / "missing.json"))


def test_loading_the_toy_pipeline_prints_no_torchvision_fallback_notice():
    code = "from diffusion_kto.sampling import load_pipeline; load_pipeline('toy', device='cpu'); print('loaded')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]
    assert "requires torchvision" not in proc.stderr and "falling back to" not in proc.stderr
