"""Property tests: arbitrary overrides and YAML never crash the config parser with anything but ConfigError."""
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusion_kto.config import ConfigError, load_config

KEYS = ["loss.beta", "loss.utility", "train.batch_size", "data.desirable_ratio", "lora.rank", "train.resume",
        "log.validation_prompts", "model.pretrained", "optim.lr", "train.gradient_checkpointing", "nope.x", "loss"]
VALUES = st.one_of(st.text(max_size=40), st.integers(), st.floats(allow_nan=True), st.booleans(),
                   st.lists(st.text(max_size=5), max_size=3)).map(lambda v: v if isinstance(v, str) else yaml.safe_dump(v).strip())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=20), VALUES), max_size=4))
def test_overrides_never_crash(pairs):
    try:
        load_config(None, [f"{k}={v}" for k, v in pairs])
    except ConfigError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_yaml_files_never_crash(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("c") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError:
        pass


def test_non_finite_and_unusable_values():
    import pytest

    for override, message in [("loss.beta=.nan", "finite"), ("optim.lr=.inf", "finite"),
                              ("train.resume=a\x00b", "train.resume")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
