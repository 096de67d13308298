"""Training on a tiny SD pipeline: what changes, what stays frozen, exports, resume, guards."""
import pytest
import torch
from safetensors.torch import load_file

from tiny import logged_metrics, tiny_overrides
from diffusion_kto.config import ConfigError, load_config
from diffusion_kto.train import DiffusionKTOTrainer


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("reference_point", ["mismatched", "matched", "per_prompt"])
def test_lora_kto_trains_only_adapters(tiny_sd, feedback, tmp_path, reference_point):
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "run", **{
        "lora.rank": 4, "loss.reference_point": reference_point}))
    trainer = DiffusionKTOTrainer(cfg)
    fam = trainer.family
    unet = fam.trainable_module()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    vae, te = _snapshot(fam.vae), _snapshot(fam.text_encoder)
    result = trainer.train()
    trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    changed = {n for n, p in unet.named_parameters() if not torch.equal(before[n], p.detach())}
    assert trained and all("lora" in n for n in trained)
    assert changed == trained  # every trainable parameter changed, no frozen one did
    assert not _changed(vae, fam.vae) and not _changed(te, fam.text_encoder)
    assert result.steps == 3
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"kl"' in lines[0] and '"reward_liked"' in lines[0]


def test_full_finetune_changes_every_unet_weight_and_not_the_reference(tiny_sd, feedback, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "run"))
    trainer = DiffusionKTOTrainer(cfg)
    fam = trainer.family
    before, ref_before = _snapshot(fam.unet), _snapshot(fam.ref_unet)
    vae, te = _snapshot(fam.vae), _snapshot(fam.text_encoder)
    trainer.train()
    params = {n for n, _ in fam.unet.named_parameters()}
    assert _changed(before, fam.unet) >= params
    assert not _changed(ref_before, fam.ref_unet)
    assert not _changed(vae, fam.vae) and not _changed(te, fam.text_encoder)
    assert (tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_sft_needs_no_disliked_rows_and_skips_reference(tiny_sd, tmp_path):
    from tiny import write_feedback
    import json

    data = write_feedback(tmp_path / "d")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("\n".join(json.dumps({**r, "label": True}) for r in rows) + "\n")
    cfg = load_config(None, tiny_overrides(tiny_sd, data, tmp_path / "run", **{"loss.name": "sft", "lora.rank": 2}))
    assert DiffusionKTOTrainer(cfg).train().steps == 3
    with pytest.raises(Exception, match="(?i)disliked"):
        DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, data, tmp_path / "run2")))


def test_kto_on_likes_only_at_gamma_one_trains_every_adapter_and_says_so_otherwise(tiny_sd, tmp_path):
    """Likes only: at gamma 0.5 KTO refuses in one line naming data.desirable_ratio=1.0; there it trains (Eq. 8's
    liked term alone), every LoRA weight changes and the frozen UNet does not."""
    from tiny import write_feedback
    import json

    data = write_feedback(tmp_path / "d")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("\n".join(json.dumps({**r, "label": True}) for r in rows) + "\n")
    overrides = {"lora.rank": 2, "data.desirable_ratio": 0.5}
    with pytest.raises(Exception, match=r"no disliked rows.*or with data\.desirable_ratio=1\.0") as info:
        DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, data, tmp_path / "run", **overrides)))
    assert "\n" not in str(info.value)
    trainer = DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, data, tmp_path / "run2", **{
        **overrides, "data.desirable_ratio": 1.0})))
    unet = trainer.family.trainable_module()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    assert trainer.train().steps == 3
    changed = {n for n, p in unet.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == {n for n, p in unet.named_parameters() if p.requires_grad}
    assert all("lora" in n for n in changed)
    metrics = logged_metrics(tmp_path / "run2" / "metrics.jsonl")
    assert all(m["reward_disliked"] is None for m in metrics)  # logged as null: no disliked row drawn


def test_v_prediction_model_trains(tiny_sd_v, feedback, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_sd_v, feedback, tmp_path / "run", **{"lora.rank": 2, "train.max_steps": 1}))
    trainer = DiffusionKTOTrainer(cfg)
    assert trainer.family.noise_scheduler.config.prediction_type == "v_prediction"
    assert trainer.train().steps == 1


def test_refuses_existing_output_dir(tiny_sd, feedback, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="already exists"):
        DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, feedback, out)))
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_replaces_an_existing_output_dir(tiny_sd, feedback, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-00000009").mkdir(parents=True)
    (out / "precious.txt").write_text("an old run")
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, out, **{"lora.rank": 2, "train.max_steps": 1,
                                                                      "train.overwrite": "true"}))
    assert DiffusionKTOTrainer(cfg).train().steps == 1
    assert not (out / "precious.txt").exists() and not (out / "checkpoints").exists()
    assert (out / "pytorch_lora_weights.safetensors").is_file() and len(logged_metrics(out / "metrics.jsonl")) == 1


def test_tensorboard_writes_the_logged_metrics_as_events(tiny_sd, feedback, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, out, **{"lora.rank": 2, "train.max_steps": 2,
                                                                      "log.report_to": "tensorboard"}))
    DiffusionKTOTrainer(cfg).train()
    runs = [EventAccumulator(str(d)) for d in sorted({p.parent for p in (out / "logs").rglob("events.out.tfevents.*")})]
    for run in runs:
        run.Reload()
    (accumulator,) = [run for run in runs if "loss" in run.Tags()["scalars"]]  # the others: the config as hparams
    logged = logged_metrics(out / "metrics.jsonl")
    loss = accumulator.Scalars("loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([row["loss"] for row in logged])
    assert {"kl", "reward_liked", "skipped_steps"} <= set(accumulator.Tags()["scalars"])


def test_resume_equals_uninterrupted(tiny_sd, feedback, tmp_path):
    """4 straight steps == 2 steps + checkpoint + resume + 2 steps (bitwise on CPU)."""
    common = {"lora.rank": 4, "train.checkpoint_every": 2}
    straight = DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "a", **common, **{"train.max_steps": 4})))
    straight.train()
    first = DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "b", **common, **{"train.max_steps": 2})))
    first.train()
    resumed = DiffusionKTOTrainer(load_config(None, tiny_overrides(
        tiny_sd, feedback, tmp_path / "b", **common, **{"train.max_steps": 4, "train.resume": "latest"})))
    resumed.train()
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = (logged_metrics(tmp_path / run / "metrics.jsonl") for run in ("a", "b"))
    assert la[2:] == lb[2:]


def test_validation_images_and_gradient_checkpointing(tiny_sd, feedback, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "run", **{
        "lora.rank": 2, "train.max_steps": 2, "train.gradient_checkpointing": "true",
        "log.validation_every": 2, "log.validation_prompts": "[a red circle, a blue square]", "log.validation_steps": 2}))
    DiffusionKTOTrainer(cfg).train()
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "validation" / "step-00000002.png")
    assert grid.width > 2 * 16 and grid.height > 2 * 16  # two rows (reference, policy) of two prompts


def test_bf16_mixed_precision_lora(tiny_sd, feedback, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "run", **{
        "lora.rank": 2, "train.max_steps": 1, "train.mixed_precision": "bf16", "log.validation_steps": 2}))
    trainer = DiffusionKTOTrainer(cfg)
    assert trainer.family.vae.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.family.trainable_parameters())
    assert trainer.train().steps == 1
    assert (tmp_path / "run" / "samples.png").is_file()  # the card's grid samples under bf16 autocast


@pytest.mark.parametrize("rank", [2, 0])
def test_validation_images_under_bf16(tiny_sd, feedback, tmp_path, rank):
    """A network prepared for mixed precision returns fp32 predictions; the bf16 VAE still decodes the latents."""
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "run", **{
        "lora.rank": rank, "train.max_steps": 1, "train.mixed_precision": "bf16", "log.validation_every": 1,
        "log.validation_prompts": "[a red circle]", "log.validation_steps": 2}))
    DiffusionKTOTrainer(cfg).train()
    assert (tmp_path / "run" / "validation" / "step-00000001.png").is_file()


def test_non_finite_steps_are_skipped_then_stop(tiny_sd, feedback, tmp_path, monkeypatch):
    from diffusion_kto import losses

    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "run", **{"lora.rank": 2, "train.max_steps": 10}))
    trainer = DiffusionKTOTrainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.family.unet.named_parameters() if p.requires_grad}
    real = losses.kto_loss

    def nan_loss(*a, **k):
        out = real(*a, **k)
        return out._replace(losses=out.losses * float("nan"))

    monkeypatch.setattr(losses, "kto_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="consecutive non-finite"):
        trainer.train()
    assert trainer.guard.skipped == 5
    for n, p in trainer.family.unet.named_parameters():
        if p.requires_grad:
            assert torch.equal(before[n], p.detach()), n


@pytest.mark.parametrize("name", ["csft", "dpo"])
def test_baselines_train(tiny_sd, tmp_path, name):
    """CSFT and DPO run through the same trainer; DPO pairs need same-prompt liked x disliked rows."""
    import json

    from tiny import write_feedback

    data = write_feedback(tmp_path / "d")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "prompt": "a red circle" if i < 4 else "a blue square"}) + "\n"
                            for i, r in enumerate(rows)))
    cfg = load_config(None, tiny_overrides(tiny_sd, data, tmp_path / "run", **{"loss.name": name, "lora.rank": 2,
                                                                                "train.batch_size": 2}))
    trainer = DiffusionKTOTrainer(cfg)
    lora = {n: p.detach().clone() for n, p in trainer.family.unet.named_parameters() if p.requires_grad}
    assert trainer.train().steps == 3
    assert all(not torch.equal(lora[n], p) for n, p in trainer.family.unet.named_parameters() if p.requires_grad)
    logged = logged_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(logged) == 3 and all(row["loss"] is not None and row["policy_err"] is not None for row in logged)
    if name == "dpo":  # each objective logs its own diagnostics: DPO's accuracy over pairs, margin and reference error
        assert all({"accuracy", "margin", "ref_err"} <= row.keys() for row in logged)
        assert all(0.0 <= row["accuracy"] <= 1.0 and row["ref_err"] > 0 for row in logged)
    else:
        assert not {"accuracy", "margin", "kl"} & logged[0].keys()


def test_full_sft_keeps_no_reference_copy(tiny_sd, feedback, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "run", **{
        "loss.name": "sft", "train.max_steps": 1, "log.validation_every": 1, "log.validation_prompts": "[a red circle]",
        "log.validation_steps": 1}))
    trainer = DiffusionKTOTrainer(cfg)
    assert trainer.family.ref_unet is None and not trainer.family.has_reference
    assert trainer.train().steps == 1
    assert (tmp_path / "run" / "validation" / "step-00000001.png").is_file()


def test_on_bad_row_skip_trains_on_the_other_rows_and_records_them(tiny_sd, tmp_path):
    import json

    from tiny import BAD_ROW_COUNTS, write_bad_feedback

    data, out = write_bad_feedback(tmp_path / "d"), tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_sd, data, out, **{
        "lora.rank": 2, "train.max_steps": 2, "data.on_bad_row": "skip"}))
    trainer = DiffusionKTOTrainer(cfg)
    assert len(trainer.rows) == 8 and not {row.where for row in trainer.rows} & {f"{data}:{i}" for i in range(2, 6)}
    result = trainer.train()  # a skipped unreadable image in a batch would fail here
    assert result.steps == 2 and result.data.n == 8 and result.data.skipped == BAD_ROW_COUNTS
    skipped = [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(r["file"], r["row"]) for r in skipped] == [(str(data), i) for i in range(2, 6)]
    summary = json.loads((out / "data_summary.json").read_text())
    assert summary["on_bad_row"] == "skip" and summary["n"] == 8 and summary["n_skipped"] == 4
    assert summary["skipped"] == BAD_ROW_COUNTS and summary["skipped_rows_file"] == str(out / "skipped_rows.jsonl")


def test_on_bad_row_error_is_the_default_and_names_every_row(tiny_sd, tmp_path):
    from tiny import write_bad_feedback

    from diffusion_kto.data import FeedbackError

    data, out = write_bad_feedback(tmp_path / "d"), tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_sd, data, out))
    with pytest.raises(FeedbackError, match=r"^4 bad rows of 12 ") as info:
        DiffusionKTOTrainer(cfg)
    assert all(f"feedback.jsonl:{i}: " in str(info.value) for i in range(2, 6))
    assert not out.exists()


def _record_reference_passes(monkeypatch):
    """Wrap the forward pass to record the size of each step's mismatched estimate (0: none this step)."""
    from diffusion_kto import forward

    sizes, real = [], forward.denoising_errors

    def errors(*args, **kwargs):
        out = real(*args, **kwargs)
        sizes.append(0 if out.reference_mismatched is None else len(out.reference_mismatched))
        return out

    monkeypatch.setattr(forward, "denoising_errors", errors)  # the trainer calls it through the module
    return sizes


def test_amortized_reference_every_k_and_fraction(tiny_sd, feedback, tmp_path, monkeypatch):
    """reference_every=2: fresh mismatched estimates on micro-steps 0, 2 only, on ceil(0.5 * 4) = 2 samples."""
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "run", **{
        "lora.rank": 2, "train.max_steps": 4, "loss.reference_every": 2, "loss.reference_fraction": 0.5,
        "loss.reference_decay": 0.5}))
    trainer = DiffusionKTOTrainer(cfg)
    sizes = _record_reference_passes(monkeypatch)
    trainer.train()
    assert sizes == [2, 0, 2, 0]
    assert trainer.objective.running.count == 2


def test_amortized_reference_resumes_exactly(tiny_sd, feedback, tmp_path, monkeypatch):
    """The running Q_ref and its clock are checkpointed: 4 straight steps == 3 + resume + 1 (bitwise on CPU)."""
    common = {"lora.rank": 2, "train.checkpoint_every": 3, "loss.reference_every": 2, "loss.reference_decay": 0.5}
    DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "a", **common,
                                                         **{"train.max_steps": 4}))).train()
    DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "b", **common,
                                                         **{"train.max_steps": 3}))).train()
    resumed = DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "b", **common, **{
        "train.max_steps": 4, "train.resume": "latest"})))
    sizes = _record_reference_passes(monkeypatch)
    resumed.train()
    assert sizes == [0]  # micro-step 3 reuses the restored estimate
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("bad, match", [
    ({"loss.reference_point": "matched", "loss.reference_every": 2}, "mismatched reference point only"),
    ({"loss.reference_fraction": 0.25}, "fewer than 2"),
    ({"loss.reference_decay": 1.0}, "reference_decay"),
])
def test_amortized_reference_config_errors(tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"{k}={v}" for k, v in {"train.batch_size": 4, **bad}.items()])


def test_prompts_longer_than_the_text_context_are_reported(tiny_sd, feedback, tmp_path, caplog):
    import json
    import logging

    rows = [json.loads(line) for line in feedback.read_text().splitlines()]
    rows[3]["prompt"] = "a photo of a red circle a photo of a blue square"  # 12 tokens, the tiny context is 8
    feedback.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "run", **{"lora.rank": 2, "train.max_steps": 1}))
    with caplog.at_level(logging.WARNING):
        trainer = DiffusionKTOTrainer(cfg)
    assert trainer.family.overlong_prompts(["a red circle", rows[3]["prompt"]]) == [rows[3]["prompt"]]
    assert f"{feedback}:4:" in caplog.text and "truncated" in caplog.text  # rows[3] is on line 4
    trainer.train()
    assert json.loads((tmp_path / "run" / "data_summary.json").read_text())["truncated_prompts"] == 1


@pytest.mark.parametrize("position, expected", [
    ("prefix", {"good image, a red circle", "bad image, a red circle"}),
    ("suffix", {"a red circle, good image", "a red circle, bad image"}),
])
def test_csft_conditions_on_the_label_phrase_at_its_position(tiny_sd, tmp_path, position, expected):
    import json

    from tiny import write_feedback

    data = write_feedback(tmp_path / "d")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "prompt": "a red circle"}) + "\n" for r in rows))
    cfg = load_config(None, tiny_overrides(tiny_sd, data, tmp_path / "run", **{
        "loss.name": "csft", "loss.csft_position": position, "lora.rank": 2, "train.batch_size": 4,
        "data.desirable_ratio": 0.5,
        "train.max_steps": 2}))
    trainer = DiffusionKTOTrainer(cfg)
    seen, encode = [], trainer.family.encode_prompts
    trainer.family.encode_prompts = lambda prompts: seen.extend(prompts) or encode(prompts)
    trainer.train()
    assert set(seen) == expected  # liked rows with "good image", disliked ones with "bad image", nothing else
