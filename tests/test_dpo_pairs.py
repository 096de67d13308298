"""Diffusion-DPO on real paired data, as given: `pairs.jsonl` (prompt, chosen, rejected; what `dkto convert to-pairs`
writes) and Pick-a-Pic-style parquet (caption, jpg_0, jpg_1, label_0, label_1; ties dropped). Both images of a pair
share their draw, hence noise and timestep."""
import io
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tiny import tiny_overrides, write_feedback
from diffusion_kto.config import load_config
from diffusion_kto.data import FeedbackError
from diffusion_kto.train import DiffusionKTOTrainer, load_feedback


def _to_pairs(tmp_path):
    """`dkto convert to-pairs` on same-prompt liked and disliked rows: its output folder."""
    data = write_feedback(tmp_path / "d")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "prompt": "a red circle" if i < 4 else "a blue square"}) + "\n"
                            for i, r in enumerate(rows)))
    out = tmp_path / "pairs"
    proc = subprocess.run([sys.executable, "-m", "diffusion_kto.cli", "convert", "to-pairs", "--src", str(data),
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def _png(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _pickapic_parquet(path):
    """Four Pick-a-Pic-style rows: jpg_0 preferred, jpg_1 preferred, a tie, jpg_0 preferred."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1, 0)]
    table = pa.table({
        "caption": ["a red circle", "a blue square", "a green circle", "a red square"],
        "jpg_0": [_png((200, 10 * i, 10)) for i in range(4)], "jpg_1": [_png((10, 10 * i, 200)) for i in range(4)],
        "label_0": [a for a, _ in labels], "label_1": [b for _, b in labels],
    })
    pq.write_table(table, path)
    return path


def test_to_pairs_output_trains_dpo_as_is(tiny_sd, tmp_path):
    pairs = _to_pairs(tmp_path)
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_sd, pairs / "pairs.jsonl", out, **{
        "loss.name": "dpo", "lora.rank": 2, "train.batch_size": 2}))
    trainer = DiffusionKTOTrainer(cfg)
    n_pairs = len((pairs / "pairs.jsonl").read_text().splitlines())
    assert len(trainer.screened.pairs) == n_pairs and len(trainer.rows) == 2 * n_pairs
    lora = {n: p.detach().clone() for n, p in trainer.family.unet.named_parameters() if p.requires_grad}
    assert trainer.train().steps == 3
    assert all(not torch.equal(lora[n], p) for n, p in trainer.family.unet.named_parameters() if p.requires_grad)
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["pairs"] == n_pairs and summary["n_desirable"] == summary["n_undesirable"] == n_pairs


def test_a_to_pairs_folder_is_read_as_pairs_too(tiny_sd, tmp_path):
    pairs = _to_pairs(tmp_path)
    cfg = load_config(None, tiny_overrides("no-model", pairs, tmp_path / "run", **{"loss.name": "dpo"}))
    assert load_feedback(cfg).summary.pairs == len((pairs / "pairs.jsonl").read_text().splitlines())


def test_both_images_of_a_pair_get_the_same_noise_and_timestep(tiny_sd, tmp_path):
    pairs = _to_pairs(tmp_path)
    cfg = load_config(None, tiny_overrides(tiny_sd, pairs / "pairs.jsonl", tmp_path / "run", **{
        "loss.name": "dpo", "lora.rank": 2, "train.batch_size": 3, "train.max_steps": 2}))
    trainer = DiffusionKTOTrainer(cfg)
    family, seen, batches = trainer.family, [], []
    real_noisy, real_step = family.noisy, trainer.step

    def noisy(x0, noise, t):
        seen.append((noise.detach().clone(), t.detach().clone()))
        return real_noisy(x0, noise, t)

    def step(batch):
        batches.append(batch)
        return real_step(batch)

    family.noisy, trainer.step = noisy, step
    trainer.train()
    assert len(seen) == len(batches) == 2
    for (noise, t), batch in zip(seen, batches):
        p = len(batch) // 2  # 3 pairs: all chosen images first, then their rejected partners in the same order
        assert p == 3 and batch.desirable[:p].all() and not batch.desirable[p:].any()
        assert batch.prompts[:p] == batch.prompts[p:] and torch.equal(batch.draw_ids[:p], batch.draw_ids[p:])
        assert torch.equal(noise[:p], noise[p:]) and torch.equal(t[:p], t[p:])
        assert not torch.equal(noise[0], noise[1])  # different pairs, different draws


def test_pickapic_parquet_trains_dpo_with_the_preferred_side_chosen_and_ties_dropped(tiny_sd, tmp_path):
    data = _pickapic_parquet(tmp_path / "pickapic.parquet")
    cfg = load_config(None, tiny_overrides(tiny_sd, data, tmp_path / "run", **{
        "loss.name": "dpo", "lora.rank": 2, "train.batch_size": 2, "train.max_steps": 1}))
    screened = load_feedback(cfg)
    assert screened.summary.pairs == 3 and screened.summary.dropped == {"tie": 1}
    chosen = [p.chosen.image for p in screened.pairs]
    assert chosen == [_png((200, 0, 10)), _png((10, 10, 200)), _png((200, 30, 10))]  # row 1: jpg_1 preferred
    assert [p.prompt for p in screened.pairs] == ["a red circle", "a blue square", "a red square"]
    assert DiffusionKTOTrainer(cfg).train().steps == 1
    assert json.loads((tmp_path / "run" / "data_summary.json").read_text())["dropped"] == {"tie": 1}


def test_bad_pairs_are_named_before_any_model_loads_or_skipped(tmp_path):
    pairs = _to_pairs(tmp_path)
    lines = (pairs / "pairs.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    lines[1] = json.dumps({**first, "rejected": "images/gone.png"})
    lines.append(json.dumps({"prompt": "a red circle", "chosen": first["chosen"]}))  # no rejected
    (pairs / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    overrides = {"loss.name": "dpo", "lora.rank": 2}
    with pytest.raises(FeedbackError, match=r"^2 bad rows of \d+ \(1 missing image, 1 missing key\)") as info:
        DiffusionKTOTrainer(load_config(None, tiny_overrides("no-model", pairs / "pairs.jsonl", tmp_path / "a",
                                                             **overrides)))
    assert f"pairs.jsonl:2: image '{pairs / 'images' / 'gone.png'}' not found" in str(info.value)
    cfg = load_config(None, tiny_overrides("no-model", pairs / "pairs.jsonl", tmp_path / "b", **overrides,
                                           **{"data.on_bad_row": "skip"}))
    screened = load_feedback(cfg)
    assert screened.summary.pairs == len(lines) - 2 and screened.summary.n_skipped == 2


def test_per_image_objectives_refuse_pairs_with_a_way_out(tmp_path):
    pairs = _to_pairs(tmp_path)
    with pytest.raises(FeedbackError, match=r"pairs\.jsonl: holds preference pairs .*loss\.name=dpo.*dkto convert pairs"):
        load_feedback(load_config(None, tiny_overrides("no-model", pairs / "pairs.jsonl", tmp_path / "r")))
