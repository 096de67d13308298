"""The Diffusion-KTO training loop on accelerate: the only module that touches accelerate.

One step (paper §4, Eq. 8): encode prompts and images, draw t and noise per sample, make x_t, compute the
per-sample denoising errors of the policy and of the frozen reference on the same (x_t, t, noise, c), estimate
the reference point Q_ref (on mismatched prompts, the batch itself, or 0), all-reduce it, and apply the loss."""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import diffusion, losses
from ..config import Config, ConfigError, save_config, to_dict
from ..data import DesirableSampler, FeedbackDataset, FeedbackSummary, collate
from ..data.baselines import csft_prompt
from ..data.cache import CacheError, LatentCache, prompts_used
from ..data.pairs import PairDataset, collate_pairs, feedback_to_pairs
from ..data.stream import StreamingFeedbackDataset, check_readers, collate_stream
from ..models import DiffusionFamily, load_family
from . import checkpoint, sharded, zero
from .inputs import DTYPES, load_feedback, open_stream, write_data_report
from .metrics import MetricsFile, postfix
from .precompute import cache_key

log = logging.getLogger(__name__)

# Streams of the counter-based randomness: each sample's draws depend only on (seed, draw id, stream).
_STREAM_TIMESTEP, _STREAM_NOISE, _STREAM_LATENT = 1, 2, 3
_LOSSES_NEEDING_REFERENCE = {"kto", "dpo"}
MAX_SCALER_BACKOFFS = 30  # fp16: consecutive scaler-skipped steps (scale / 2**30) before the run is stopped


@dataclass
class StepOutput:
    """What one micro-step produced: the reduced loss, local metric values, and whether the optimizer stepped."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    stepped: bool = False  # an optimizer step was taken (the last micro-step of an accumulation window, finite)


@dataclass
class TrainResult:
    """Summary of a finished run."""

    output_dir: Path
    steps: int
    exported: list[str]
    seconds: float
    images_per_second: float
    skipped_steps: int
    main_process: bool = True
    data: FeedbackSummary | None = None  # rows trained on and bad rows skipped (None: rows were passed in)
    data_wait_seconds: float = 0.0  # time the loop spent waiting for the next batch (loading, decoding, collating)


def check_output_dir(cfg: Config) -> None:
    """Refuse to write into an existing, non-empty output dir unless resuming or ``train.overwrite=true``."""
    out = Path(cfg.train.output_dir)
    if not out.exists() or not any(out.iterdir()):
        return
    if cfg.train.resume is not None:
        return
    if cfg.train.overwrite:
        shutil.rmtree(out, ignore_errors=True)  # every process of a multi-process run gets here
        return
    raise ConfigError(
        f"train.output_dir: {str(out)!r} already exists and is not empty; pass train.resume=latest to continue "
        "that run, train.overwrite=true to replace it, or choose another train.output_dir"
    )


class DiffusionKTOTrainer:
    """Trains a model family with Diffusion-KTO (or a baseline) from one :class:`Config`."""

    def __init__(self, cfg: Config, *, family: DiffusionFamily | None = None, rows=None):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import ProjectConfiguration, set_seed

        self.cfg = cfg
        self.out = Path(cfg.train.output_dir)
        self.shards = open_stream(cfg) if cfg.data.streaming else None
        self.screened = load_feedback(cfg) if rows is None and self.shards is None else None
        self.rows = rows if rows is not None or self.shards is not None else self.screened.rows
        check_output_dir(cfg)
        report_to = None if cfg.log.report_to == "none" else cfg.log.report_to
        _require_tracker(report_to)
        AcceleratorState._reset_state()  # several runs in one process (demo, benchmarks) may differ in precision
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            log_with=report_to,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
            **zero.accelerator_kwargs(cfg),
        )
        _fsdp_on_cpu(self.accelerator)
        _require_supported_distribution(self.accelerator)
        _require_fp16_device(self.accelerator, cfg.train.mixed_precision)
        self.fsdp = self.accelerator.is_fsdp2  # the UNet is sharded: whole state dicts are gathered collectively
        self.deepspeed = zero.launched()  # ZeRO-2: the engine clips and steps inside backward
        if self.shards:
            check_readers(len(self.shards), self.accelerator.num_processes * max(cfg.data.num_workers, 1), cfg.data.path)
        self.weight_dtype = DTYPES[cfg.train.mixed_precision]
        set_seed(cfg.train.seed)  # LoRA initialisation draws from the global RNGs
        self.cache, self.text_cache = self._open_cache()
        self.family = family or load_family(cfg, weight_dtype=self.weight_dtype, device=self.accelerator.device,
                                            with_reference=cfg.loss.name in _LOSSES_NEEDING_REFERENCE,
                                            components=self._components())
        self.overlong_prompts = self._check_prompt_lengths()
        self.optimizer = self._setup_optimizer()
        self.lr_scheduler = self._setup_lr_scheduler()
        self.family.wrap(self._prepare)
        self.global_step = 0
        self.micro_step = 0  # micro-batches seen: the clock of loss.reference_every
        self.reference: losses.RunningReference | None = None  # the running mismatched Q_ref (amortized)
        self.skipped = 0
        self._consecutive_bad = 0
        self.scaler_skipped = 0  # fp16: steps the gradient scaler skipped while lowering its scale (not errors)
        self._consecutive_overflow = 0
        self.stream_cursors: dict[str, list[int]] = {}  # data.streaming: reader -> cursor after its last used batch
        self.stream_readers: int | None = None
        self._stream_resume: dict | None = None
        self.metrics_file = MetricsFile(self.out / "metrics.jsonl", enabled=self.accelerator.is_main_process)

    # ---------------------------------------------------------------------------------------- setup

    def _open_cache(self) -> tuple[LatentCache | None, LatentCache | None]:
        """data.cache checked against this run: (latents, text) caches; text is None when the encoder must run."""
        cfg = self.cfg
        if cfg.data.cache is None:
            return None, None
        cache = LatentCache(cfg.data.cache)
        cache.check(cache_key(cfg, text=cache.has_text))
        cache.image_keys(self.rows)  # refuse changed or new images now, before any model loads
        if not cache.has_text:
            return cache, None
        missing = cache.missing_prompts(prompts_used(self.rows, caption_dropout=cfg.data.caption_dropout,
                                                     csft=cfg.loss.csft()))
        if missing:
            where = next((r.where for r in self.rows if r.prompt == missing[0]), "caption dropout or CSFT prefix")
            raise CacheError(f"{cache.manifest_path}: key 'prompts' has no embedding for {missing[0]!r} ({where}) "
                             f"and {len(missing) - 1} more prompts of this run; rebuild the cache with this run's "
                             "data.caption_dropout and loss.name")
        return cache, cache

    def _components(self) -> tuple[str, ...]:
        """The networks to load: no VAE / text encoder whose outputs are cached (sampling for validation needs both)."""
        validating = bool(self.cfg.log.validation_every and self.cfg.log.validation_prompts)
        return ("unet",) + (("vae",) if self.cache is None or validating else ()) + \
            (("text_encoder",) if self.text_cache is None or validating else ())

    def _check_prompt_lengths(self) -> int:
        """Warn (main process) about prompts longer than the text encoder's context (truncated, as diffusers does);
        their count, which only the main process reports (data_summary.json)."""
        if self.rows is None or not self.accelerator.is_main_process:  # streaming: rows are not known up front
            return 0
        csft = self.cfg.loss.csft()
        prompts = prompts_used(self.rows, caption_dropout=0.0, csft=csft)
        overlong = self.family.overlong_prompts(prompts)
        if overlong:
            where = next(r.where for r in self.rows if overlong[0] in prompts_used([r], caption_dropout=0.0, csft=csft))
            log.warning("%d of %d prompts are longer than the text encoder's context and are truncated when encoded, "
                        "e.g. %s: %r", len(overlong), len(prompts), where, overlong[0][:120])
        return len(overlong)

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (bitsandbytes 8-bit AdamW with optim.use_8bit_adam)."""
        o = self.cfg.optim
        params = self.family.trainable_parameters()
        if not params:
            raise RuntimeError("the model has no trainable parameters")
        kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon, weight_decay=o.weight_decay)
        if not o.use_8bit_adam:
            return torch.optim.AdamW(params, **kwargs)
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "optim.use_8bit_adam=true needs bitsandbytes: pip install bitsandbytes (CUDA machines), "
                "or set optim.use_8bit_adam=false"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)

    def _prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Prepare the UNet and its optimizer in one accelerate call (FSDP 2 shards the UNet and points the optimizer
        at the sharded parameters; the frozen reference copy is never prepared)."""
        module, self.optimizer = self.accelerator.prepare(module, self.optimizer)
        return module

    def _setup_lr_scheduler(self):
        """Warm-up then constant / linear / cosine decay over train.max_steps optimizer steps."""
        from diffusers.optimization import get_scheduler

        return get_scheduler(
            self.cfg.optim.lr_scheduler,
            optimizer=self.optimizer,
            num_warmup_steps=self.cfg.optim.warmup_steps,
            num_training_steps=self.cfg.train.max_steps,
        )

    def _loader(self, start_micro_step: int):
        """An endless DataLoader of this process's share of the gamma-sampled global batches (pairs for dpo)."""
        cfg, acc = self.cfg, self.accelerator
        transform = dict(resolution=cfg.data.resolution, center_crop=cfg.data.center_crop,
                         random_flip=cfg.data.random_flip, caption_dropout=cfg.data.caption_dropout, seed=cfg.train.seed)
        ratio = 1.0 if cfg.loss.name == "sft" else cfg.data.desirable_ratio  # sft sees liked rows only
        sampler = None
        if self.shards:
            dataset, collate_fn = StreamingFeedbackDataset(
                self.shards, desirable_ratio=ratio, buffer_size=cfg.data.stream_buffer, batch_size=cfg.train.batch_size,
                rank=acc.process_index, world_size=acc.num_processes, start_step=start_micro_step,
                resume=self._stream_resume, source=cfg.data.path,
                columns=(cfg.data.image_column, cfg.data.prompt_column, cfg.data.label_column), **transform,
            ), collate_stream
        else:
            if cfg.loss.name == "dpo":
                pairs = feedback_to_pairs(self.rows, cfg.data.max_pairs_per_prompt, seed=cfg.train.seed)
                dataset, collate_fn = PairDataset(pairs, cache=self.cache, **transform), collate_pairs
                desirable, ratio = [True] * len(pairs), 1.0  # pairs are drawn uniformly
            else:
                dataset, collate_fn = FeedbackDataset(self.rows, cache=self.cache, **transform), collate
                desirable = [r.desirable for r in self.rows]
            sampler = DesirableSampler(
                desirable,
                ratio,
                seed=cfg.train.seed,
                batch_size=cfg.train.batch_size,
                rank=acc.process_index,
                world_size=acc.num_processes,
                start_step=start_micro_step,
            )
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.train.batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=cfg.data.num_workers,
            pin_memory=acc.device.type == "cuda",
            persistent_workers=cfg.data.num_workers > 0,
        )

    def _note_stream(self, batch: dict[str, Any]) -> None:
        """Remember where the reader of a streamed batch stood after it (for the checkpoint)."""
        if "stream" in batch:
            reader, readers, *cursor = batch["stream"]
            self.stream_cursors[str(reader)] = [int(c) for c in cursor]
            self.stream_readers = int(readers)

    def _keep_stream_cursors(self, state: dict | None, path: Path) -> None:
        """Start from the resumed cursors of this process's readers, so a reader that makes no batch before the next
        checkpoint keeps its position there (a warning when the reader layout changed)."""
        workers, acc = max(self.cfg.data.num_workers, 1), self.accelerator
        _warn_stream_layout(state, acc.num_processes * workers, path)
        if state and state.get("readers") == acc.num_processes * workers:
            mine = {str(acc.process_index * workers + w) for w in range(workers)}
            self.stream_cursors = {k: list(v) for k, v in state["cursors"].items() if k in mine}
            self.stream_readers = state["readers"]

    def _stream_state(self) -> dict | None:
        """The readers' cursors of every process (a collective call: every process must make it)."""
        if not self.shards:
            return None
        from accelerate.utils import gather_object

        cursors: dict[str, list[int]] = {}
        for part in gather_object([self.stream_cursors]):
            cursors.update(part)
        return {"readers": self.stream_readers, "cursors": cursors}

    # ---------------------------------------------------------------------------------------- public steps

    def loader(self, start_step: int = 0):
        """An endless DataLoader of this process's share of the global batches, from micro-step ``start_step``."""
        return self._loader(start_step)

    def accumulate(self):
        """Context manager of one micro-step: gradients are synchronised and stepped at accumulation boundaries."""
        return self.accelerator.accumulate(self.family.trainable_module())

    def step(self, batch: dict[str, Any]) -> StepOutput:
        """One micro-step: forward, loss, backward, and the optimizer step at an accumulation boundary."""
        with self.accumulate():
            result = self.train_step(batch)
            result.stepped = self.optimizer_step(result)
        return result

    def optimizer_step(self, result: StepOutput) -> bool:
        """Clip and step at an accumulation boundary (after a backward); skips non-finite steps. True if stepped."""
        return self._optimizer_step(result)

    def write_summary(self, result: "TrainResult") -> None:
        """Write ``summary.json`` for a finished run (main process)."""
        self._write_summary(result)

    # ---------------------------------------------------------------------------------------- one step

    def _prompt_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings c, (B, L, D): from data.cache when it holds them, else from the text encoder."""
        if self.text_cache is None:
            return self.family.encode_prompts(prompts)
        return self.text_cache.text(prompts).to(self.accelerator.device, self.weight_dtype)

    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """x0 = mean + std * eps of the VAE posterior (cached or encoded now), eps from (seed, draw id): (B, C, h, w)."""
        seed, draws = self.cfg.train.seed, batch["draw_ids"]
        noise_fn = lambda shape: diffusion.per_sample_randn(shape[1:], seed, draws, _STREAM_LATENT)  # noqa: E731
        if "latent_mean" in batch:
            mean, std = (batch[k].to(self.accelerator.device, self.weight_dtype) for k in ("latent_mean", "latent_std"))
            return self.family.sample_latents(mean, std, noise_fn)
        return self.family.encode_images(batch["pixel_values"], noise_fn)

    def _errors(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Per-sample denoising errors of policy and reference on shared (x_t, t, noise, c); see module doc."""
        fam, seed, draws = self.family, self.cfg.train.seed, batch["draw_ids"]
        cond = self._prompt_embeddings(batch["prompts"])  # (B, L, D)
        x0 = self._latents(batch)  # (B, C, h, w)
        noise = diffusion.per_sample_randn(tuple(x0.shape[1:]), seed, draws, _STREAM_NOISE)  # (B, C, h, w)
        t = diffusion.per_sample_timesteps(fam.num_train_timesteps, seed, draws, _STREAM_TIMESTEP).to(x0.device)
        x_t, tgt = fam.noisy(x0, noise, t)
        if self.cfg.loss.name not in _LOSSES_NEEDING_REFERENCE:
            return {"policy_err": diffusion.per_sample_error(fam.predict(x_t, t, cond), tgt)}
        out: dict[str, torch.Tensor] = {}
        mode = self.cfg.loss.reference_point if self.cfg.loss.name == "kto" else "matched"
        if mode == "mismatched" and self._refresh_reference():
            b, n = len(x_t), math.ceil(self.cfg.loss.reference_fraction * len(x_t))  # Q_ref from the first n samples
            x_n, t_n, cond_mis = x_t[:n], t[:n], cond[:n].roll(1, dims=0)  # prompts rolled: unrelated pairs
            ref = fam.predict(torch.cat([x_t, x_n]), torch.cat([t, t_n]), torch.cat([cond, cond_mis]), reference=True)
            ref_match, ref_mis = ref[:b], ref[b:]  # one batched no-grad reference pass, (B + n, ...)
            with torch.no_grad():
                out["policy_err_mismatched"] = diffusion.per_sample_error(fam.predict(x_n, t_n, cond_mis), tgt[:n])
            out["ref_err_mismatched"] = diffusion.per_sample_error(ref_mis, tgt[:n])
        else:
            ref_match = fam.predict(x_t, t, cond, reference=True)
        out["ref_err"] = diffusion.per_sample_error(ref_match, tgt)
        # the grad pass last: the no-grad passes above never coexist with its saved activations (peak memory)
        out["policy_err"] = diffusion.per_sample_error(fam.predict(x_t, t, cond), tgt)
        return out

    def _refresh_reference(self) -> bool:
        """Whether this micro-step estimates the mismatched Q_ref afresh (every loss.reference_every-th one)."""
        return self.reference is None or self.micro_step % self.cfg.loss.reference_every == 0

    def _reference_point(self, errs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Q_ref over the global batch: gather per-sample errors from every process, then mean and clamp (§4.1).

        Mismatched estimates go through the running mean of loss.reference_decay; steps without a fresh estimate
        (loss.reference_every > 1) reuse it."""
        mode, device = self.cfg.loss.reference_point, errs["policy_err"].device
        if mode == "none":
            return torch.zeros((), device=device)
        suffix = "_mismatched" if mode == "mismatched" else ""
        if "ref_err" + suffix in errs:
            gather = self.accelerator.gather
            estimate = losses.reference_point(
                gather(errs["policy_err" + suffix].detach()), gather(errs["ref_err" + suffix].detach())
            )
            if mode == "matched":
                return estimate
            self.reference = losses.running_reference(self.reference, estimate, self.cfg.loss.reference_decay)
        return self.reference.value.to(device)

    def train_step(self, batch: dict[str, Any]) -> StepOutput:
        """Forward the loss for one micro-batch and backpropagate it (the optimizer step is done by the loop)."""
        cfg, acc = self.cfg, self.accelerator
        desirable = batch["desirable"].to(acc.device)
        if position := cfg.loss.csft():  # condition on the label: "good image, ..." / "bad image, ..." (or a suffix)
            batch = {**batch, "prompts": [csft_prompt(p, d, position)
                                          for p, d in zip(batch["prompts"], batch["desirable"].tolist())]}
        with acc.autocast():
            errs = self._errors(batch)
            per_sample, metrics = self._loss(errs, desirable)
        loss = per_sample.mean()
        metrics["policy_err"] = errs["policy_err"].detach().mean().item()
        finite = acc.reduce(torch.isfinite(loss.detach()).float().reshape(1), reduction="sum").item() == acc.num_processes
        if finite:
            acc.backward(loss)
        metrics["loss"] = loss.detach().item()
        metrics["finite"] = float(finite)
        self.micro_step += 1
        return StepOutput(loss=loss.detach(), metrics=metrics)

    def _loss(self, errs: dict[str, torch.Tensor], desirable: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-sample (or per-pair) losses of the configured objective and its diagnostics."""
        cfg = self.cfg.loss
        if cfg.name == "sft":
            return losses.sft_loss(errs["policy_err"], desirable).losses, {}
        if cfg.name == "csft":
            return errs["policy_err"], {}
        if cfg.name == "dpo":  # the batch holds all preferred images first, then their rejected partners
            (pw, pl), (rw, rl) = errs["policy_err"].chunk(2), errs["ref_err"].chunk(2)
            out = losses.dpo_loss(pw, pl, rw, rl, beta=cfg.beta)
            return out.losses, {"accuracy": out.accuracy.item(), "margin": out.margins.mean().item(),
                                "ref_err": errs["ref_err"].mean().item()}
        kl = self._reference_point(errs)
        out = losses.kto_loss(
            errs["policy_err"], errs["ref_err"], desirable, kl,
            beta=cfg.beta, utility=cfg.utility,
            desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
        )
        gather = self.accelerator.gather  # diagnostics over the global batch (a local slice may lack a class)
        return out.losses, _kto_metrics(gather(out.rewards), gather(desirable), kl, out.accuracy, errs)

    # ---------------------------------------------------------------------------------------- the loop

    def train(self) -> TrainResult:
        """Run to train.max_steps optimizer steps: log, validate, checkpoint, then export."""
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            if self.screened is not None:
                write_data_report(cfg, self.screened, self.out, overlong_prompts=self.overlong_prompts)
        if cfg.train.resume is not None:
            self._resume(cfg.train.resume)
        if cfg.log.report_to != "none":
            acc.init_trackers("diffusion-kto", config=_flat(to_dict(cfg)))
        loader = iter(self._loader(self.global_step * cfg.train.grad_accum))
        bar = tqdm(total=cfg.train.max_steps, initial=self.global_step, desc="train", disable=not acc.is_local_main_process)
        window: list[dict[str, float]] = []
        start, start_step, waited = time.perf_counter(), self.global_step, 0.0
        while self.global_step < cfg.train.max_steps:
            for _ in range(cfg.train.grad_accum):
                fetch = time.perf_counter()
                batch = next(loader)
                wait = time.perf_counter() - fetch
                waited += wait
                self._note_stream(batch)
                result = self.step(batch)
                stepped = result.stepped
                window.append({**result.metrics, "data_wait_ms": wait * 1000})
            if not stepped:
                continue
            self.global_step += 1
            bar.update(1)
            if self.global_step % cfg.log.every == 0 or self.global_step == cfg.train.max_steps:
                metrics = self._log(window)
                bar.set_postfix(postfix(metrics))
                window = []
            if cfg.log.validation_every and self.global_step % cfg.log.validation_every == 0:
                self.validate()
            if cfg.train.checkpoint_every and self.global_step % cfg.train.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        seconds = time.perf_counter() - start
        exported = self._finish()
        images = (self.global_step - start_step) * cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
        result = TrainResult(self.out, self.global_step, exported, seconds, images / max(seconds, 1e-9), self.skipped,
                             main_process=acc.is_main_process, data_wait_seconds=waited,
                             data=self.screened.summary if self.screened else None)
        self._write_summary(result)
        return result

    def _write_summary(self, result: TrainResult) -> None:
        """``summary.json`` in the run folder: steps, loop seconds, images/s and time waiting on data (main process)."""
        if not result.main_process:
            return
        summary = {"steps": result.steps, "seconds": round(result.seconds, 3),
                   "images_per_second": round(result.images_per_second, 3),
                   "data_wait_seconds": round(result.data_wait_seconds, 3),
                   "data_wait_share": round(result.data_wait_seconds / max(result.seconds, 1e-9), 4),
                   "skipped_steps": result.skipped_steps, "scaler_skipped_steps": self.scaler_skipped,
                   "cached_latents": self.cache is not None,
                   "cached_text": self.text_cache is not None}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    def _optimizer_step(self, result: StepOutput) -> bool:
        """Clip, step and zero the optimizer at accumulation boundaries; skip non-finite steps (counted).

        Returns True when an optimizer step was taken."""
        acc = self.accelerator
        bad = not result.metrics["finite"]
        if not acc.sync_gradients:
            return False
        if self.deepspeed:
            return self._deepspeed_step(result)
        params = self.family.trainable_parameters()
        if self.cfg.optim.max_grad_norm > 0 and not bad:
            norm = acc.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
            result.metrics["grad_norm"] = float(norm)
            # fp16: an overflow of the *scaled* gradients is the scaler's to handle (its step skips and backs off)
            bad = not math.isfinite(float(norm)) and acc.scaler is None
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self._skip_bad_step()
            return False
        self.optimizer.step()
        if self.optimizer.step_was_skipped:  # fp16: the scaler found inf/NaN gradients and lowered its scale
            self.optimizer.zero_grad(set_to_none=True)
            self._skip_overflow_step()
            return False
        self._stepped(result)
        return True

    def _deepspeed_step(self, result: StepOutput) -> bool:
        """The accumulation boundary under DeepSpeed, whose engine has clipped (optim.max_grad_norm) and stepped inside
        ``accelerator.backward``, or skipped the step and zeroed the gradients when their norm was not finite (ZeRO-2,
        fp32). A non-finite loss skipped its backward; a NaN one is run instead, so that the engine discards the
        window's earlier gradients the same way. Either skip is counted as under DDP."""
        engine = self.family.trainable_module()
        if not result.metrics["finite"]:
            self.accelerator.backward(zero.poison(self.family.trainable_parameters()))
        norm = engine.get_global_grad_norm()  # None only with zero_optimization.compute_grad_norm=false
        result.metrics["grad_norm"] = math.nan if norm is None else float(norm)
        if self.optimizer.step_was_skipped:
            self._skip_bad_step()
            return False
        self._stepped(result)
        return True

    def _stepped(self, result: StepOutput) -> None:
        """After an optimizer step: advance the LR schedule, zero the gradients, reset the bad-step count."""
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._consecutive_bad = self._consecutive_overflow = 0
        result.metrics["lr"] = self.lr_scheduler.get_last_lr()[0]

    def _skip_bad_step(self) -> None:
        """Count a non-finite loss or gradient; stop after too many in a row (last checkpoint stays intact)."""
        self.skipped += 1
        self._consecutive_bad += 1
        log.warning("non-finite loss or gradient at step %d: step skipped (%d so far)", self.global_step + 1, self.skipped)
        if self._consecutive_bad >= 5:
            raise FloatingPointError(
                f"{self._consecutive_bad} consecutive non-finite steps at step {self.global_step + 1}; stopping. "
                "The last checkpoint is intact: lower optim.lr or loss.beta, or try train.mixed_precision=bf16/no"
            )

    def _skip_overflow_step(self) -> None:
        """Count a step the fp16 gradient scaler skipped; normal while it finds its scale, an error if it never does."""
        self.scaler_skipped += 1
        self._consecutive_overflow += 1
        log.info("fp16 gradient scaler skipped step %d (overflow; scale now %g)", self.global_step + 1,
                 self.accelerator.scaler.get_scale())
        if self._consecutive_overflow >= MAX_SCALER_BACKOFFS:
            raise FloatingPointError(
                f"the fp16 gradient scaler skipped {self._consecutive_overflow} steps in a row at step {self.global_step + 1} "
                "(the gradients overflow at every scale); stopping. Try train.mixed_precision=bf16 or no"
            )

    def _log(self, window: list[dict[str, float]]) -> dict[str, float]:
        """Average the window's metrics, reduce across processes, and write them everywhere asked."""
        acc = self.accelerator
        keys = sorted({k for m in window for k in m if k != "finite"})
        local = torch.tensor([_nanmean([m.get(k, math.nan) for m in window]) for k in keys], device=acc.device)
        values = acc.reduce(local, reduction="mean") if acc.num_processes > 1 else local
        metrics = {k: float(v) for k, v in zip(keys, values.tolist())}
        metrics["skipped_steps"] = float(self.skipped)
        self.metrics_file.write(self.global_step, metrics)
        if self.cfg.log.report_to != "none":
            acc.log(metrics, step=self.global_step)
        return metrics

    # ---------------------------------------------------------------------------------------- I/O

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint (main process), atomically; every process waits for it."""
        acc = self.accelerator
        path, stream = None, self._stream_state()
        weights, optimizer = self._gather_states()
        if acc.is_main_process:
            path = checkpoint.save_checkpoint(
                self.out / "checkpoints",
                self.global_step,
                weights=weights,
                optimizer=optimizer,
                scheduler={"lr_scheduler": self.lr_scheduler.state_dict(), "torch_rng": torch.get_rng_state()},
                state={"step": self.global_step, "skipped": self.skipped, "scaler_skipped": self.scaler_skipped,
                       "reference": _reference_state(self.reference), **({"stream": stream} if stream else {}),
                       # fp16: the gradient scaler's scale and growth count, so a resumed run skips what this one would
                       **({"scaler": self.accelerator.scaler.state_dict()} if self.accelerator.scaler else {})},
                config=to_dict(self.cfg),
                keep=self.cfg.train.keep_checkpoints,
            )
        acc.wait_for_everyone()
        return path

    def _whole_model_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP the UNet's whole state dict on the main process (collective), else None: the module is whole."""
        return sharded.gather_model_state(self.family.trainable_module()) if self.fsdp else None

    def _gather_states(self) -> tuple[dict, dict]:
        """(trainable weights, optimizer state) for a checkpoint, whole, on the main process (empty on the others)."""
        if not self.fsdp:
            main = self.accelerator.is_main_process
            return (self.family.trainable_state(), self.optimizer.state_dict()) if main else ({}, {})
        model = self._whole_model_state()
        optimizer = sharded.gather_optimizer_state(self.family.trainable_module(), self.optimizer.optimizer)
        return (self.family.trainable_state(model) if self.accelerator.is_main_process else {}), optimizer

    def _load_states(self, weights: dict[str, torch.Tensor], optimizer: dict, path: Path) -> None:
        """Restore trainable weights and optimizer state (sharded into place under FSDP)."""
        _require_same_optimizer_layout(optimizer, fsdp=self.fsdp, path=path)
        if not self.fsdp:
            self.family.load_trainable_state({k: v.to(self.accelerator.device) for k, v in weights.items()})
            self.optimizer.load_state_dict(optimizer)
            return
        unet = self.family.trainable_module()
        sharded.load_model_state(unet, self.family.model_state(weights))
        sharded.load_optimizer_state(unet, self.optimizer.optimizer, optimizer)

    def _resume(self, which: str) -> None:
        """Restore weights, optimizer, LR schedule, RNG and step from ``latest`` or a checkpoint folder."""
        path = checkpoint.latest_checkpoint(self.out / "checkpoints") if which == "latest" else Path(which)
        if path is None:
            log.warning("train.resume=latest: no complete checkpoint in %s; starting from step 0", self.out / "checkpoints")
            return
        state = checkpoint.load_checkpoint(path)
        self._load_states(state["weights"], state["optimizer"], path)
        self.lr_scheduler.load_state_dict(state["scheduler"]["lr_scheduler"])
        torch.set_rng_state(state["scheduler"]["torch_rng"])
        self.global_step = int(state["state"]["step"])
        self.skipped = int(state["state"].get("skipped", 0))
        self.scaler_skipped = int(state["state"].get("scaler_skipped", 0))
        if self.accelerator.scaler and "scaler" in state["state"]:
            self.accelerator.scaler.load_state_dict(state["state"]["scaler"])
        self._stream_resume = state["state"].get("stream")
        if self.shards:
            self._keep_stream_cursors(self._stream_resume, path)
        self.micro_step = self.global_step * self.cfg.train.grad_accum
        self.reference = _restore_reference(state["state"].get("reference"))  # None: re-estimated at once
        if self.accelerator.is_main_process:
            print(f"resumed from {path} at step {self.global_step}")

    def _finish(self) -> list[str]:
        """Final checkpoint (if checkpointing is on), validation images, and the diffusers export."""
        acc = self.accelerator
        if self.cfg.train.checkpoint_every and self.global_step % self.cfg.train.checkpoint_every:
            self.save_checkpoint()
        if self.cfg.log.validation_every and self.global_step % self.cfg.log.validation_every:
            self.validate()
        model_state = self._whole_model_state()
        exported = self.family.export(str(self.out), model_state) if acc.is_main_process else []
        acc.wait_for_everyone()
        acc.end_training()
        return exported

    def validate(self) -> Path | None:
        """Policy and reference images for log.validation_prompts with the same seeds, side by side."""
        from ..sampling import generate_pair_grid

        cfg, acc = self.cfg, self.accelerator
        if not cfg.log.validation_prompts or not (acc.is_main_process or self.fsdp):
            return None  # under FSDP every process samples: each forward gathers the UNet's shards from all of them
        grid = generate_pair_grid(
            self.family,
            cfg.log.validation_prompts,
            seed=cfg.train.seed,
            steps=cfg.log.validation_steps,
            guidance=cfg.log.validation_guidance,
            resolution=cfg.data.resolution,
        )
        if not acc.is_main_process:
            return None
        path = self.out / "validation" / f"step-{self.global_step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path


def _reference_state(ref: losses.RunningReference | None) -> dict | None:
    """The running Q_ref as JSON numbers (float32 values round-trip exactly through a Python float)."""
    return None if ref is None else {"value": float(ref.value), "raw": float(ref.raw), "count": ref.count}


def _restore_reference(state: dict | None) -> losses.RunningReference | None:
    """Inverse of :func:`_reference_state`."""
    if state is None:
        return None
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return losses.RunningReference(value=as_tensor(state["value"]), raw=as_tensor(state["raw"]), count=int(state["count"]))


def _kto_metrics(rewards: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, accuracy: torch.Tensor,
                 errs: dict) -> dict[str, float]:
    """Diagnostics: reference point, implicit rewards of liked and disliked samples, accuracy, reference error."""
    rewards = rewards.float()
    liked, disliked = rewards[desirable], rewards[~desirable]
    return {
        "kl": float(kl),
        "reward_liked": liked.mean().item() if liked.numel() else math.nan,
        "reward_disliked": disliked.mean().item() if disliked.numel() else math.nan,
        "accuracy": accuracy.item(),
        "ref_err": errs["ref_err"].mean().item(),
    }


def _warn_stream_layout(state: dict | None, readers: int, path: Path) -> None:
    """Say when a resumed stream cannot continue each reader where it stood (see data/stream.py)."""
    if not state or not state.get("cursors"):
        log.warning("%s holds no stream position: the stream starts again from its first rows", path)
    elif state.get("readers") != readers:
        log.warning("%s was written with %s stream readers, now %d (processes x data.num_workers): every reader "
                    "starts at the beginning of the earliest recorded epoch", path, state.get("readers"), readers)


def _fsdp_on_cpu(accelerator) -> None:
    """Keep FSDP on CPU processes. accelerate (1.15) applies an FSDP launch's plugin only on accelerator devices and
    runs CPU processes (MULTI_CPU, gloo) as plain DDP, silently; put FSDP back the way AcceleratorState does on GPUs."""
    import os

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* environment, as accelerate builds it
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # both singletons, as AcceleratorState does: every later AcceleratorState() copies PartialState's value back
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


def _require_fp16_device(accelerator, precision: str) -> None:
    """Refuse fp16 where accelerate sets up no autocast and gradient scaler (a CPU): it would fail on dtypes later.
    (DeepSpeed launches refuse mixed precision before the accelerator exists: :func:`.zero.accelerator_kwargs`.)"""
    if precision == "fp16" and accelerator.scaler is None:
        raise ConfigError(
            f"train.mixed_precision=fp16 needs a CUDA device (accelerate sets up fp16 autocast and its gradient scaler "
            f"only there); this process runs on {accelerator.device.type}: use train.mixed_precision=bf16 or no"
        )


def _require_supported_distribution(accelerator) -> None:
    """Refuse what the trainer cannot run: Megatron-LM, FSDP 1, and a DeepSpeed launch that accelerate ran as
    something else (``--cpu`` / ``ACCELERATE_USE_CPU`` make it plain DDP). DDP, FSDP 2 and DeepSpeed ZeRO-2 (with the
    limits of :mod:`.zero`) are supported."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError(
            "accelerate FSDP 1 is not supported by the trainer (its flat parameters hide the LoRA / reference "
            "structure); set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml), see docs/multi-gpu.md"
        )
    if zero.launched() and kind != "DEEPSPEED":
        raise ConfigError(
            f"this is a DeepSpeed launch, but accelerate runs it as {kind} (plain data parallel, without DeepSpeed), "
            "which happens with --cpu or ACCELERATE_USE_CPU=1; drop those (without CUDA the trainer sets up "
            "DeepSpeed's CPU accelerator and gloo itself), see docs/multi-gpu.md#deepspeed"
        )
    if kind == "MEGATRON_LM":
        raise ConfigError(
            "accelerate distributed_type MEGATRON_LM is not supported by the trainer; launch with "
            "configs/accelerate/multi-gpu-ddp.yaml, fsdp.yaml or deepspeed-zero2.yaml instead, see docs/multi-gpu.md"
        )


def _require_same_optimizer_layout(optimizer: dict, *, fsdp: bool, path: Path) -> None:
    """A checkpoint's optimizer state is keyed by parameter index (DDP, one process) or by name (FSDP); refuse the
    other kind with a clear message instead of a KeyError deep in torch."""
    params = [p for group in optimizer.get("param_groups", []) for p in group.get("params", [])]
    by_name = bool(params) and isinstance(params[0], str)
    if params and by_name != fsdp:
        written, now = ("an FSDP", "without FSDP") if by_name else ("a DDP / single-process", "under FSDP")
        raise ConfigError(f"train.resume: {path} was written by {written} run and cannot be resumed {now}; resume it "
                          "with the accelerate config it was trained with")


def _require_tracker(report_to: str | None) -> None:
    """A clear error when log.report_to names a tracker whose package is missing."""
    import importlib.util

    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to or "")
    if package and importlib.util.find_spec(package) is None and not (
        package == "tensorboard" and importlib.util.find_spec("tensorboardX")
    ):
        raise ConfigError(f"log.report_to={report_to} needs the {package} package: pip install {package}")


def _nanmean(values: list[float]) -> float:
    """Mean of the finite values, NaN when there are none."""
    finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config dict to dotted keys with tracker-friendly values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
