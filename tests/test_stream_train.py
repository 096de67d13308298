"""Training the tiny SD from streamed tar shards (data.streaming=true): it trains, checkpoints the stream, resumes."""
import json

import pytest
import torch

from tiny import tiny_overrides
from diffusion_kto.config import ConfigError, load_config
from diffusion_kto.data import read_feedback
from diffusion_kto.data.shards import shard_pattern, write_shards
from diffusion_kto.train import DiffusionKTOTrainer


@pytest.fixture
def shards(feedback, tmp_path) -> str:
    """The 8-row `feedback` set as 4 tar shards of 2 rows, named by a brace pattern."""
    return shard_pattern(write_shards(read_feedback(feedback), tmp_path / "shards", rows_per_shard=2))


def _stream_overrides(tiny_sd, shards, out, **extra):
    return tiny_overrides(tiny_sd, shards, out, **{"data.streaming": "true", "data.stream_buffer": 2, **extra})


def test_streamed_lora_kto_changes_every_trainable_parameter(tiny_sd, shards, tmp_path):
    trainer = DiffusionKTOTrainer(load_config(None, _stream_overrides(tiny_sd, shards, tmp_path / "run", **{"lora.rank": 4})))
    assert trainer.rows is None and len(trainer.shards) == 4
    unet = trainer.family.trainable_module()
    before = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
    assert trainer.train().steps == 3
    assert before and all(not torch.equal(before[n], p.detach()) for n, p in unet.named_parameters() if p.requires_grad)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"reward_liked"' in lines[0]


def test_streamed_run_checkpoints_the_stream_and_resumes(tiny_sd, shards, tmp_path):
    common = {"lora.rank": 2, "train.checkpoint_every": 2, "data.num_workers": 2}
    DiffusionKTOTrainer(load_config(None, _stream_overrides(tiny_sd, shards, tmp_path / "run", **common,
                                                            **{"train.max_steps": 2}))).train()
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-00000002" / "state.json").read_text())
    assert state["stream"]["readers"] == 2 and set(state["stream"]["cursors"]) == {"0", "1"}
    resumed = DiffusionKTOTrainer(load_config(None, _stream_overrides(
        tiny_sd, shards, tmp_path / "run", **common, **{"train.max_steps": 3, "train.resume": "latest"})))
    assert resumed.train().steps == 3
    assert resumed._stream_resume == state["stream"]
    final = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-00000003" / "state.json").read_text())
    assert set(final["stream"]["cursors"]) == {"0", "1"}  # reader 1 made no batch after the resume: kept its cursor
    assert final["stream"]["cursors"]["1"] == state["stream"]["cursors"]["1"]
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_stream_problems_are_found_before_any_model_loads(tmp_path, shards):
    with pytest.raises(Exception, match="no such shard file"):
        DiffusionKTOTrainer(load_config(None, _stream_overrides("no-model", tmp_path / "s-{0..1}.tar", tmp_path / "r")))
    with pytest.raises(Exception, match="4 shard.*for 8 readers"):
        DiffusionKTOTrainer(load_config(None, _stream_overrides("no-model", shards, tmp_path / "r",
                                                                **{"data.num_workers": 8})))
    with pytest.raises(ConfigError, match="data.streaming: loss.name=dpo"):
        load_config(None, _stream_overrides("no-model", shards, tmp_path / "r", **{"loss.name": "dpo"}))


def test_streamed_run_skips_bad_rows_with_on_bad_row_skip_and_reports_them(tiny_sd, feedback, tmp_path):
    """A shard with an unreadable image and an unknown label: skip trains on the others and reports the count; error
    (the default) stops naming the shard and the key."""
    from tiny import write_bad_feedback

    from diffusion_kto.data import FeedbackError

    bad = write_bad_feedback(tmp_path / "bad")  # lines 2-5 bad: missing / unreadable image, unknown label, empty prompt
    rows = read_feedback(bad, bad_rows=[])  # the rows a reader can parse; the two with broken images stay in
    shards = shard_pattern(write_shards([r for r in rows if r.image.is_file()], tmp_path / "s", rows_per_shard=5))
    out = tmp_path / "run"
    result = DiffusionKTOTrainer(load_config(None, _stream_overrides(tiny_sd, shards, out, **{
        "lora.rank": 2, "data.on_bad_row": "skip"}))).train()
    assert result.steps == 3
    assert json.loads((out / "summary.json").read_text())["stream_skipped_rows"] >= 1
    with pytest.raises(FeedbackError, match=r"train-00000\d\.tar:00000000\d: image .* cannot be read"):
        DiffusionKTOTrainer(load_config(None, _stream_overrides(tiny_sd, shards, tmp_path / "run2",
                                                                **{"lora.rank": 2}))).train()
