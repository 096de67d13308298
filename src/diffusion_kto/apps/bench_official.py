"""The official Diffusion-KTO script's step design, rebuilt for `dkto bench step --end-to-end` to time against ours.

What is emulated: the training step of ``train_kto_sd_v1.5.py`` (jacklishufan/diffusion-kto; see the research
notes, §2.4), on this project's model loading, data pipeline, optimizer and loss maths, so that only the *design*
of a step differs from `dkto train`:

* every step encodes the images with the VAE (a posterior draw times the scaling factor) and the prompts with
  the text encoder: nothing is cached;
* the full fine-tune's reference is a frozen copy of the initial UNet weights kept on the CPU, swapped into the
  training UNet for the reference forward, the way diffusers' ``EMAModel`` does it: ``store`` (a CPU clone of
  every trained weight), ``copy_to`` (reference weights in), a no-grad forward, ``restore`` (trained weights
  back). With LoRA the reference is the UNet with its adapters disabled, as in ours;
* the reference point is the script's default: matched, the batch mean of ref_err - policy_err, detached and
  clamped at 0; then the KT loss, backward, gradient clipping and an AdamW step; the step's losses are read
  back for the per-step log.

Not emulated: the script's fp32 VAE under mixed precision (the VAE here runs in the compute dtype, as in ours; the
same in fp32 runs) and its 8-bit AdamW (here the configured optimizer).

Run as ``python -m diffusion_kto.apps.bench_official --warmup N key=value ...`` with the overrides of a `dkto train`
run: it writes ``summary.json`` in ``train.output_dir`` in the trainer's shape, plus per-part times.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .. import diffusion, losses
from ..config import Config, ConfigError, load_config
from ..data import Batch
from ..models import load_family, unwrap
from ..models.base import Conditioning

PARTS = ("vae_encode", "text_encode", "swap", "reference")  # timed parts of a step ("reference" includes "swap")


class PartTimes:
    """Seconds spent in named parts of each step (CUDA is synchronised at both ends of a part)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.steps: list[dict[str, float]] = [{}]

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Add the time spent inside the block to part ``name`` of the current step."""
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            current = self.steps[-1]
            current[name] = current.get(name, 0.0) + time.perf_counter() - start

    def _sync(self) -> None:
        """Wait for queued CUDA work, so that a part's time is its own."""
        if self.cuda:
            torch.cuda.synchronize()

    def next_step(self) -> None:
        """Start recording the next step."""
        self.steps.append({})

    def median_ms(self, first: int) -> dict[str, float]:
        """Median milliseconds of every part over the steps from ``first`` on."""
        steps = [s for s in self.steps[first:] if s]
        return {name: round(1000 * statistics.median(s.get(name, 0.0) for s in steps), 3) for name in PARTS} if steps else {}


def store(params: list[nn.Parameter]) -> list[Tensor]:
    """EMAModel.store: a CPU clone of every current weight (a device-to-host copy of the whole UNet on a GPU)."""
    return [p.detach().cpu().clone() for p in params]


def copy_into(params: list[nn.Parameter], values: list[Tensor]) -> None:
    """EMAModel.copy_to / restore: overwrite every weight in place from (CPU) tensors of the same shapes.

    Through ``.data``, as EMAModel does: autograd does not see the copies, so the policy forward's saved tensors
    stay valid and its backward, after the restore, runs on the trained weights again."""
    for p, v in zip(params, values, strict=True):
        p.data.copy_(v.to(p.device))


def swapped_reference(family, reference: list[Tensor], x_t: Tensor, t: Tensor, cond: Conditioning,
                      parts: PartTimes | None = None) -> Tensor:
    """The script's full fine-tune reference forward: store, copy the reference into the trained network, no-grad
    forward of the policy (now holding the reference weights), restore."""
    parts = parts or PartTimes(x_t.device)
    params = list(unwrap(family.trainable_module()).parameters())
    with parts("swap"):
        trained = store(params)
        copy_into(params, reference)
    try:
        with torch.no_grad():
            return family.predict(x_t, t, cond)
    finally:
        with parts("swap"):
            copy_into(params, trained)


def cpu_reference(family) -> list[Tensor] | None:
    """The script's full fine-tune reference: a frozen CPU copy of the initial UNet weights (None with LoRA)."""
    if family.lora_rank > 0:
        return None
    return [p.detach().to("cpu", copy=True) for p in unwrap(family.trainable_module()).parameters()]


def reference_prediction(family, reference: list[Tensor] | None, x_t: Tensor, t: Tensor, cond: Conditioning,
                         parts: PartTimes) -> Tensor:
    """The script's reference forward: the weight swap (full fine-tune) or the UNet with adapters off (LoRA)."""
    if reference is None:
        return family.predict(x_t, t, cond, reference=True)
    return swapped_reference(family, reference, x_t, t, cond, parts)


def official_trainer(cfg: Config):
    """Our trainer (loader, optimizer, LR schedule, accelerator) around a family loaded without a frozen GPU copy."""
    from ..train import DiffusionKTOTrainer
    from ..train.inputs import DTYPES

    if cfg.loss.name != "kto" or cfg.loss.reference_point != "matched" or cfg.data.cache is not None:
        raise ConfigError("the official step design is loss.name=kto, loss.reference_point=matched, no data.cache")
    torch.manual_seed(cfg.train.seed)  # LoRA initialisation
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    family = load_family(cfg, weight_dtype=DTYPES[cfg.train.mixed_precision], device=device, with_reference=False)
    return DiffusionKTOTrainer(cfg, family=family)


def batch_inputs(batch: Batch) -> tuple[Tensor, list[str], Tensor]:
    """(pixels, prompts, liked) of a batch from the trainer's loader: the one place that reads its fields."""
    return batch.pixels, batch.prompts, batch.desirable


def official_step(trainer, batch, reference: list[Tensor] | None, step: int, parts: PartTimes) -> dict[str, float]:
    """One step of the script: encode images and prompts, policy forward, reference forward, matched Q_ref, KT
    loss, backward, clipped AdamW step; returns the per-step log (with ``stepped``: whether the optimizer stepped)."""
    from ..train import StepOutput

    fam, acc, cfg = trainer.family, trainer.accelerator, trainer.cfg
    pixels, prompts, desirable = batch_inputs(batch)
    generator = diffusion.step_generator(cfg.train.seed, step)
    with trainer.accumulate(), acc.autocast():
        with parts("vae_encode"):
            x0 = fam.encode_images(pixels, lambda shape: diffusion.sample_noise(shape, generator))
        with parts("text_encode"):
            cond = fam.condition(fam.encode_prompts(prompts), batch)
        noise = diffusion.sample_noise(tuple(x0.shape), generator)
        t = diffusion.sample_timesteps(len(x0), fam.num_train_timesteps, generator).to(x0.device)
        x_t, tgt, _ = fam.noisy(x0, noise, t)
        policy_err = diffusion.per_sample_error(fam.predict(x_t, t, cond), tgt)  # (B,), with grad
        with parts("reference"):
            ref_err = diffusion.per_sample_error(reference_prediction(fam, reference, x_t, t, cond, parts), tgt)
        kl = losses.reference_point(policy_err, ref_err)  # matched: the batch itself, clamped at 0
        out = losses.kto_loss(policy_err, ref_err, desirable, kl, beta=cfg.loss.beta, utility=cfg.loss.utility,
                              desirable_weight=cfg.loss.desirable_weight,
                              undesirable_weight=cfg.loss.undesirable_weight)
        loss = out.losses.mean()
        acc.backward(loss)
        stepped = trainer.optimizer_step(StepOutput(loss=loss.detach(), metrics={"finite": 1.0}))
    return {"loss": loss.item(), "kl": kl.item(), "policy_err": policy_err.mean().item(),
            "ref_err": ref_err.mean().item(), "accuracy": out.accuracy.item(), "stepped": stepped}


def run_official(overrides: list[str], warmup: int) -> dict:
    """A `dkto train`-shaped run of the official step design: train.max_steps steps, then the script's checkpoint
    (the UNet's ``save_pretrained``); writes and returns ``summary.json`` with per-part times."""
    from ..train import TrainResult

    cfg = load_config(None, overrides)
    trainer = official_trainer(cfg)
    reference = cpu_reference(trainer.family)
    loader = iter(trainer.loader())
    parts = PartTimes(trainer.accelerator.device)
    step_seconds, waited, taken = [], 0.0, 0
    start = time.perf_counter()
    while taken < cfg.train.max_steps:  # optimizer steps taken, as `dkto train` counts them (fp16 scaler skips redone)
        fetch = time.perf_counter()
        batch = next(loader)
        waited += time.perf_counter() - fetch
        taken += official_step(trainer, batch, reference, len(step_seconds), parts)["stepped"]
        step_seconds.append(time.perf_counter() - fetch)
        parts.next_step()
    seconds = time.perf_counter() - start
    unwrap(trainer.family.trainable_module()).save_pretrained(trainer.out / "unet", safe_serialization=True)
    images = cfg.train.max_steps * cfg.train.batch_size
    trainer.write_summary(TrainResult(trainer.out, cfg.train.max_steps, [], seconds, images / seconds, 0,
                                      data_wait_seconds=waited))
    timed = step_seconds[warmup:] or step_seconds
    extra = {"images_per_second_after_warmup": round(len(timed) * cfg.train.batch_size / sum(timed), 3),
             "step_ms_median": round(1000 * statistics.median(timed), 3), "parts_ms": parts.median_ms(warmup)}
    path = trainer.out / "summary.json"
    summary = {**json.loads(path.read_text()), **extra}
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str]) -> int:
    """Worker entry point: ``python -m diffusion_kto.apps.bench_official --warmup N key=value ...``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m diffusion_kto.apps.bench_official")
    parser.add_argument("--warmup", type=int, default=0, help="steps left out of the after-warm-up times")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    run_official(args.overrides, args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
