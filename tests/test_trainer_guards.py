"""The non-finite guard under gradient accumulation: a non-finite micro-step anywhere in an accumulation window skips,
counts and logs the whole window, and a non-finite gradient is caught even when clipping is off."""
import logging

import pytest
import torch

from tiny import logged_metrics, tiny_overrides
from diffusion_kto import losses
from diffusion_kto.config import load_config
from diffusion_kto.train import DiffusionKTOTrainer


def _nan_loss_at(monkeypatch, micro_steps):
    """KTO's per-sample losses are NaN on the given calls (one call per micro-step, counted from 0)."""
    real, calls = losses.kto_loss, []

    def kto_loss(*a, **k):
        out = real(*a, **k)
        calls.append(len(calls))
        return out._replace(losses=out.losses * float("nan")) if calls[-1] in micro_steps else out

    monkeypatch.setattr(losses, "kto_loss", kto_loss)
    return calls


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.family.unet.named_parameters() if p.requires_grad}


def test_a_non_finite_micro_step_before_the_last_skips_the_whole_window(tiny_sd, feedback, tmp_path, monkeypatch,
                                                                        caplog):
    """grad_accum 2, NaN at micro-step 0: the optimizer must not step on micro-step 1's gradients alone. The window is
    skipped, counted, named in a warning and in the log row; the next window makes step 1."""
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, out, **{
        "lora.rank": 2, "train.max_steps": 1, "train.grad_accum": 2, "train.batch_size": 2}))
    trainer = DiffusionKTOTrainer(cfg)
    calls = _nan_loss_at(monkeypatch, {0})
    with caplog.at_level(logging.WARNING):
        result = trainer.train()
    assert len(calls) == 4 and trainer.micro_step == 4  # window 1 (micro-steps 0, 1) skipped, window 2 stepped
    assert result.steps == 1 and result.skipped_steps == 1 and trainer.guard.skipped == 1
    assert "micro-step 1 of 2" in caplog.text and "skipped" in caplog.text
    (row,) = logged_metrics(out / "metrics.jsonl")
    assert row["skipped_steps"] == 1 and row["nonfinite_micro_steps"] == 1


def test_a_skipped_window_leaves_the_weights_as_a_run_without_it(tiny_sd, feedback, tmp_path, monkeypatch):
    """The skipped window contributes nothing: its finite micro-step's gradient is dropped with the NaN one, so the
    weights after the next window equal those of one optimizer step on that window alone."""
    common = {"lora.rank": 2, "train.max_steps": 1, "train.grad_accum": 2, "train.batch_size": 2}
    skipped = DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "a", **common)))
    _nan_loss_at(monkeypatch, {0})
    skipped.train()
    monkeypatch.undo()
    clean = DiffusionKTOTrainer(load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "b", **common)))
    loader = iter(clean.loader(2))  # the second window's micro-batches (micro-steps 2 and 3)
    clean.micro_step = 2
    for _ in range(2):
        clean.step(next(loader))
    a, b = _trainable(skipped), _trainable(clean)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_a_non_finite_gradient_of_a_finite_loss_is_skipped_with_clipping_on_or_off(tiny_sd, feedback, tmp_path,
                                                                                   monkeypatch, max_grad_norm):
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, tmp_path / "run", **{
        "lora.rank": 2, "train.max_steps": 10, "optim.max_grad_norm": max_grad_norm}))
    trainer = DiffusionKTOTrainer(cfg)
    before = _trainable(trainer)
    real = losses.kto_loss
    monkeypatch.setattr(losses, "kto_loss", lambda *a, **k: (o := real(*a, **k))._replace(
        losses=_NanGradient.apply(o.losses)))
    with pytest.raises(FloatingPointError, match="consecutive non-finite"):
        trainer.train()
    assert trainer.guard.skipped == 5
    after = _trainable(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_grad_norm_is_logged_with_clipping_off(tiny_sd, feedback, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, out, **{
        "lora.rank": 2, "train.max_steps": 2, "optim.max_grad_norm": 0.0}))
    DiffusionKTOTrainer(cfg).train()
    rows = logged_metrics(out / "metrics.jsonl")
    assert all(row["grad_norm"] > 0 and row["nonfinite_micro_steps"] == 0 for row in rows)
