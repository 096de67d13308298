"""Config: YAML + dotted overrides, validation with named keys, and every shipped config."""
from pathlib import Path

import pytest

from diffusion_kto.config import ConfigError, load_config, save_config, to_dict

CONFIG_DIR = Path(__file__).parent.parent / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"sd15-kto-full.yaml", "sd15-kto-lora.yaml", "sd21-kto.yaml", "toy-kto.yaml", "sdxl-kto-lora.yaml",
            "sdxl-kto-full.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.loss.name == "kto"


def test_paper_settings_in_sd15_full():
    cfg = load_config(CONFIG_DIR / "sd15-kto-full.yaml")
    assert (cfg.loss.beta, cfg.optim.lr, cfg.data.desirable_ratio, cfg.lora.rank) == (5000.0, 1e-7, 0.8, 0)
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_overrides_win_and_are_typed():
    cfg = load_config(CONFIG_DIR / "sd15-kto-lora.yaml", ["loss.beta=2000", "train.resume=latest",
                                                           "log.validation_prompts=[a, b]", "model.revision=null"])
    assert cfg.loss.beta == 2000.0 and isinstance(cfg.loss.beta, float)
    assert cfg.train.resume == "latest" and cfg.log.validation_prompts == ["a", "b"] and cfg.model.revision is None


@pytest.mark.parametrize("override, message", [
    ("loss.bta=1", "unknown config key loss.bta"),
    ("nope=1", "unknown config key nope"),
    ("loss.utility=prospect", "loss.utility: 'prospect' is not allowed; choose one of kt, loss_averse, risk_seeking"),
    ("loss.reference_point=global", "mismatched, matched, per_prompt, centred, none"),
    ("loss.name=ppo", "loss.name"),
    ("train.mixed_precision=fp8", "no, fp16, bf16"),
    ("loss.beta=0", "loss.beta: must be > 0"),
    ("data.desirable_ratio=1.5", "data.desirable_ratio: must be <= 1"),
    ("train.batch_size=two", "train.batch_size: expected an integer"),
    ("train.gradient_checkpointing=maybe", "expected true or false"),
    ("loss.beta", "key=value"),
    ("train.resume=/does/not/exist", "train.resume"),
    ("data.on_bad_row=drop", "data.on_bad_row: 'drop' is not allowed; choose one of error, skip"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_mismatched_reference_point_needs_two_samples():
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        load_config(None, ["train.batch_size=1"])
    assert load_config(None, ["train.batch_size=1", "loss.reference_point=matched"]).train.batch_size == 1


def test_bad_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("loss: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIG_DIR / "sd15-kto-full.yaml", ["loss.utility=loss_averse"])
    save_config(cfg, tmp_path / "c.yaml")
    assert to_dict(load_config(tmp_path / "c.yaml")) == to_dict(cfg)


def test_yaml_1_1_quirks_are_read_as_meant(tmp_path):
    """1e-5 (no dot) is a string in YAML 1.1 and `no` a boolean; both mean what the user wrote."""
    cfg = load_config(None, ["optim.lr=1e-5", "train.mixed_precision=no"])
    assert cfg.optim.lr == 1e-5 and cfg.train.mixed_precision == "no"
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 3e-6\ntrain:\n  mixed_precision: no\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.optim.lr == 3e-6 and cfg.train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(None, ["optim.lr=fast"])
