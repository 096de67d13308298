"""The training loop: one config in, a trained and exported model out.

One micro-step (paper §4, Eq. 8): the objective rewrites the prompts it conditions on (CSFT), the family encodes
them (or the cache holds them) and the images' latents, :mod:`diffusion_kto.forward` computes the per-sample
denoising errors the objective asks for, and the objective turns them into per-sample losses (gathering what it needs
over processes through the function it is given). This module schedules micro-steps into optimizer steps, logs,
validates, checkpoints and exports; :mod:`.distributed` holds the multi-process plumbing."""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import forward
from ..config import Config, ConfigError, save_config, to_dict
from ..data import Batch, DesirableSampler, FeedbackDataset, collate
from ..data.cache import CacheError, LatentCache, row_prompts
from ..data.pairs import PairDataset, collate_pairs, feedback_to_pairs
from ..data.stream import StreamingFeedbackDataset, check_readers, collate_stream
from ..models import DiffusionFamily, load_family
from ..models.base import Conditioning
from ..objectives import build_objective, prompt_groups
from . import checkpoint
from .distributed import fsdp, require_same_optimizer_layout, setup_accelerator, zero
from .guards import StepGuard
from .inputs import DTYPES, load_feedback, open_stream, write_data_report
from .metrics import MetricsFile, TrainResult, flat_config, postfix, reduce_window, require_tracker, write_summary
from .optim import build_lr_scheduler, build_optimizer
from .precompute import cache_key
from .streaming import StreamPosition

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one micro-step produced: the reduced loss, local metric values, and whether the optimizer stepped."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    stepped: bool = False  # an optimizer step was taken (the last micro-step of an accumulation window, finite)


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
    """Trains a model family with Diffusion-KTO (or a baseline objective) from one :class:`Config`.

    Public: :meth:`loader`, :meth:`step` (one micro-step, with the optimizer step at accumulation boundaries),
    :meth:`train` (the whole run), :meth:`save_checkpoint`, :meth:`write_validation_images`."""

    def __init__(self, cfg: Config, *, family: DiffusionFamily | None = None, rows=None):
        from accelerate.utils import set_seed

        self.cfg, self.out = cfg, Path(cfg.train.output_dir)
        self.objective = build_objective(cfg)
        self.shards = open_stream(cfg) if cfg.data.streaming else None
        self.screened = load_feedback(cfg) if rows is None and self.shards is None else None
        self.rows = rows if rows is not None or self.shards is not None else self.screened.rows
        check_output_dir(cfg)
        report_to = None if cfg.log.report_to == "none" else cfg.log.report_to
        require_tracker(report_to)
        self.accelerator = setup_accelerator(cfg, self.out, report_to)
        self.fsdp = self.accelerator.is_fsdp2  # the network is sharded: whole state dicts are gathered collectively
        self.deepspeed = zero.launched()  # ZeRO-2: the engine clips and steps inside backward
        if self.shards:
            check_readers(len(self.shards), self.accelerator.num_processes * max(cfg.data.num_workers, 1), cfg.data.path)
        self.weight_dtype = DTYPES[cfg.train.mixed_precision]
        set_seed(cfg.train.seed)  # LoRA initialisation draws from the global RNGs
        self.cache, self.text_cache = self._open_cache()
        self.family = family or load_family(cfg, weight_dtype=self.weight_dtype, device=self.accelerator.device,
                                            with_reference=self.objective.needs_reference,
                                            components=self._components())
        self.overlong_prompts = self._check_prompt_lengths()
        self.optimizer = build_optimizer(cfg, self.family.trainable_parameters())
        self.lr_scheduler = build_lr_scheduler(cfg, self.optimizer)
        self.family.wrap(self._prepare)
        self.global_step = 0  # optimizer steps taken
        self.micro_step = 0  # micro-batches seen: the clock of the objective's plan (loss.reference_every)
        self.guard = StepGuard()
        self.stream = StreamPosition()
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
        missing = cache.missing_prompts(self._prompts_used(self.rows, cfg.data.caption_dropout))
        if missing:
            where = next((r.where for r in self.rows if r.prompt == missing[0]), "caption dropout or CSFT prefix")
            raise CacheError(f"{cache.manifest_path}: key 'prompts' has no embedding for {missing[0]!r} ({where}) "
                             f"and {len(missing) - 1} more prompts of this run; rebuild the cache with this run's "
                             "data.caption_dropout and loss.name")
        return cache, cache

    def _prompts_used(self, rows, caption_dropout: float) -> list[str]:
        """Every prompt the text encoder sees for these rows, as the objective conditions them."""
        return self.objective.prompts_used(row_prompts(rows, caption_dropout=caption_dropout))

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
        prompts = self._prompts_used(self.rows, 0.0)
        overlong = self.family.overlong_prompts(prompts)
        if overlong:
            where = next(r.where for r in self.rows if overlong[0] in self._prompts_used([r], 0.0))
            log.warning("%d of %d prompts are longer than the text encoder's context and are truncated when encoded, "
                        "e.g. %s: %r", len(overlong), len(prompts), where, overlong[0][:120])
        return len(overlong)

    def _prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Prepare the network and its optimizer in one accelerate call (FSDP 2 shards the network and points the
        optimizer at the sharded parameters; the frozen reference copy is never prepared)."""
        module, self.optimizer = self.accelerator.prepare(module, self.optimizer)
        return module

    # ---------------------------------------------------------------------------------------- data

    def loader(self, start_step: int = 0):
        """An endless DataLoader of this process's share of the gamma-sampled global batches (pairs for a paired
        objective), from micro-step ``start_step`` on."""
        cfg, acc = self.cfg, self.accelerator
        transform = dict(resolution=cfg.data.resolution, center_crop=cfg.data.center_crop,
                         random_flip=cfg.data.random_flip, caption_dropout=cfg.data.caption_dropout, seed=cfg.train.seed)
        ratio = self.objective.liked_share(cfg.data.desirable_ratio)
        sampler = None
        if self.shards:
            dataset, collate_fn = StreamingFeedbackDataset(
                self.shards, desirable_ratio=ratio, buffer_size=cfg.data.stream_buffer, batch_size=cfg.train.batch_size,
                rank=acc.process_index, world_size=acc.num_processes, start_step=start_step,
                resume=self._stream_resume, source=cfg.data.path,
                columns=(cfg.data.image_column, cfg.data.prompt_column, cfg.data.label_column), **transform,
            ), collate_stream
        else:
            if self.objective.paired:
                pairs = feedback_to_pairs(self.rows, cfg.data.max_pairs_per_prompt, seed=cfg.train.seed)
                dataset, collate_fn = PairDataset(pairs, cache=self.cache, **transform), collate_pairs
                desirable = [True] * len(pairs)  # the sampler draws pairs
            else:
                dataset, collate_fn = FeedbackDataset(self.rows, cache=self.cache, **transform), collate
                desirable = [r.desirable for r in self.rows]
            sampler = DesirableSampler(desirable, ratio, seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                                       rank=acc.process_index, world_size=acc.num_processes, start_step=start_step)
        return torch.utils.data.DataLoader(
            dataset, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate_fn,
            num_workers=cfg.data.num_workers, pin_memory=acc.device.type == "cuda",
            persistent_workers=cfg.data.num_workers > 0,
        )

    # ---------------------------------------------------------------------------------------- one step

    def _conditioning(self, prompts: list[str], batch: Batch) -> Conditioning:
        """The family's conditioning of a batch: the prompts' (from data.cache when it holds them, else from the text
        encoder) plus the family's per-image parts."""
        if self.text_cache is None:
            text = self.family.encode_prompts(prompts)
        else:
            text = self.family.conditioning.from_tensors(self.text_cache.text(prompts))
            text = text.to(self.accelerator.device, self.weight_dtype)
        return self.family.condition(text, batch)

    def _forward_backward(self, batch: Batch) -> StepOutput:
        """The objective's loss on one micro-batch, backpropagated when it is finite on every process."""
        acc, objective, seed = self.accelerator, self.objective, self.cfg.train.seed
        desirable = batch.desirable.to(acc.device)
        prompts = [objective.condition(p, d) for p, d in zip(batch.prompts, batch.desirable.tolist())]
        with acc.autocast():
            cond = self._conditioning(prompts, batch)
            x0 = forward.clean_latents(self.family, batch, seed)  # (B, C, h, w)
            plan = objective.plan(self.micro_step, len(x0))
            errors = forward.denoising_errors(self.family, x0, cond, batch.draw_ids, seed, plan)
            out = objective.loss(errors, desirable, acc.gather, prompt_groups(batch.prompts).to(acc.device))
        loss = out.losses.mean()
        metrics = {**out.metrics, "policy_err": errors.policy.detach().mean().item()}
        finite = acc.reduce(torch.isfinite(loss.detach()).float().reshape(1), reduction="sum").item() == acc.num_processes
        if finite:
            acc.backward(loss)
        metrics["loss"] = loss.detach().item()
        metrics["finite"] = float(finite)
        self.micro_step += 1
        return StepOutput(loss=loss.detach(), metrics=metrics)

    def accumulate(self):
        """Context manager of one micro-step: gradients are synchronised and stepped at accumulation boundaries."""
        return self.accelerator.accumulate(self.family.trainable_module())

    def step(self, batch: Batch) -> StepOutput:
        """One micro-step: forward, loss, backward, and the optimizer step at an accumulation boundary."""
        self.stream.note(batch)
        with self.accumulate():
            result = self._forward_backward(batch)
            result.stepped = self.optimizer_step(result)
        return result

    def optimizer_step(self, result: StepOutput) -> bool:
        """Clip, step and zero the optimizer at accumulation boundaries (after a backward); skip non-finite steps
        (counted). Returns True when an optimizer step was taken."""
        acc = self.accelerator
        bad = not result.metrics["finite"]
        if not acc.sync_gradients:
            return False
        if self.deepspeed:
            return self._deepspeed_step(result)
        if self.cfg.optim.max_grad_norm > 0 and not bad:
            norm = acc.clip_grad_norm_(self.family.trainable_parameters(), self.cfg.optim.max_grad_norm)
            result.metrics["grad_norm"] = float(norm)
            # fp16: an overflow of the *scaled* gradients is the scaler's to handle (its step skips and backs off)
            bad = not math.isfinite(float(norm)) and acc.scaler is None
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.bad_step(self.global_step + 1)
            return False
        self.optimizer.step()
        if self.optimizer.step_was_skipped:  # fp16: the scaler found inf/NaN gradients and lowered its scale
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.overflow_step(self.global_step + 1, acc.scaler.get_scale())
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
            self.guard.bad_step(self.global_step + 1)
            return False
        self._stepped(result)
        return True

    def _stepped(self, result: StepOutput) -> None:
        """After an optimizer step: advance the LR schedule, zero the gradients, end the runs of skipped steps."""
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.good_step()
        result.metrics["lr"] = self.lr_scheduler.get_last_lr()[0]

    # ---------------------------------------------------------------------------------------- the loop

    def _start(self) -> None:
        """Write the resolved config and data report, resume if asked, and open the trackers."""
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            if self.screened is not None:
                write_data_report(cfg, self.screened, self.out, overlong_prompts=self.overlong_prompts)
        if cfg.train.resume is not None:
            self._resume(cfg.train.resume)
        if cfg.log.report_to != "none":
            acc.init_trackers("diffusion-kto", config=flat_config(to_dict(cfg)))

    def train(self) -> TrainResult:
        """Run to train.max_steps optimizer steps: log, validate, checkpoint, then export."""
        cfg, acc = self.cfg, self.accelerator
        self._start()
        loader = iter(self.loader(self.global_step * cfg.train.grad_accum))
        bar = tqdm(total=cfg.train.max_steps, initial=self.global_step, desc="train",
                   disable=not acc.is_local_main_process)
        window: list[dict[str, float]] = []
        start, start_step, waited = time.perf_counter(), self.global_step, 0.0
        while self.global_step < cfg.train.max_steps:
            for _ in range(cfg.train.grad_accum):
                fetch = time.perf_counter()
                batch = next(loader)
                wait = time.perf_counter() - fetch
                waited += wait
                result = self.step(batch)
                window.append({**result.metrics, "data_wait_ms": wait * 1000})
            if not result.stepped:
                continue
            self.global_step += 1
            bar.update(1)
            if self.global_step % cfg.log.every == 0 or self.global_step == cfg.train.max_steps:
                bar.set_postfix(postfix(self._log(window)))
                window = []
            self._every(cfg.log.validation_every, self.write_validation_images)
            self._every(cfg.train.checkpoint_every, self.save_checkpoint)
        bar.close()
        seconds = time.perf_counter() - start
        exported = self._finish()
        images = (self.global_step - start_step) * cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
        result = TrainResult(self.out, self.global_step, exported, seconds, images / max(seconds, 1e-9),
                             self.guard.skipped, main_process=acc.is_main_process, data_wait_seconds=waited,
                             data=self.screened.summary if self.screened else None)
        self.write_summary(result)
        return result

    def _every(self, period: int, action) -> None:
        """Run ``action`` when the global step is a multiple of ``period`` (0: never)."""
        if period and self.global_step % period == 0:
            action()

    def _log(self, window: list[dict[str, float]]) -> dict[str, float]:
        """Average the window's metrics over micro-steps and processes, and write them everywhere asked."""
        metrics = {**reduce_window(self.accelerator, window), "skipped_steps": float(self.guard.skipped)}
        self.metrics_file.write(self.global_step, metrics)
        if self.cfg.log.report_to != "none":
            self.accelerator.log(metrics, step=self.global_step)
        return metrics

    def write_summary(self, result: TrainResult) -> None:
        """``summary.json`` of a finished run (main process), with the fp16 skips and what was cached."""
        write_summary(self.out, result, scaler_skipped_steps=self.guard.scaler_skipped,
                      cached_latents=self.cache is not None, cached_text=self.text_cache is not None)

    def _finish(self) -> list[str]:
        """Final checkpoint (if checkpointing is on), validation images, and the diffusers export."""
        acc, cfg = self.accelerator, self.cfg
        if cfg.train.checkpoint_every and self.global_step % cfg.train.checkpoint_every:
            self.save_checkpoint()
        if cfg.log.validation_every and self.global_step % cfg.log.validation_every:
            self.write_validation_images()
        model_state = self._whole_model_state()
        exported = self.family.export(str(self.out), model_state) if acc.is_main_process else []
        acc.wait_for_everyone()
        acc.end_training()
        return exported

    def write_validation_images(self) -> Path | None:
        """Policy and reference images for log.validation_prompts with the same seeds, side by side."""
        from ..sampling import generate_pair_grid

        cfg, acc = self.cfg, self.accelerator
        if not cfg.log.validation_prompts or not (acc.is_main_process or self.fsdp):
            return None  # under FSDP every process samples: each forward gathers the network's shards from all of them
        prompts = [self.objective.sampling_prompt(p) for p in cfg.log.validation_prompts]
        grid = generate_pair_grid(self.family, prompts, seed=cfg.train.seed, steps=cfg.log.validation_steps,
                                  guidance=cfg.log.validation_guidance, resolution=cfg.data.resolution)
        if not acc.is_main_process:
            return None
        path = self.out / "validation" / f"step-{self.global_step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path

    # ---------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint (main process), atomically; every process waits for it."""
        acc = self.accelerator
        stream = self.stream.state() if self.shards else None  # collective
        weights, optimizer = self._gather_states()
        path = None
        if acc.is_main_process:
            path = checkpoint.save_checkpoint(
                self.out / "checkpoints", self.global_step, weights=weights, optimizer=optimizer,
                scheduler={"lr_scheduler": self.lr_scheduler.state_dict(), "torch_rng": torch.get_rng_state()},
                state=self._counters(stream), config=to_dict(self.cfg), keep=self.cfg.train.keep_checkpoints,
            )
        acc.wait_for_everyone()
        return path

    def _counters(self, stream: dict | None) -> dict:
        """The JSON state of a checkpoint: step, skip counts, the objective's state, stream position, fp16 scaler."""
        scaler = self.accelerator.scaler
        return {"step": self.global_step, "skipped": self.guard.skipped, "scaler_skipped": self.guard.scaler_skipped,
                "reference": self.objective.state_dict(), **({"stream": stream} if stream else {}),
                # fp16: the gradient scaler's scale and growth count, so a resumed run skips what this one would
                **({"scaler": scaler.state_dict()} if scaler else {})}

    def _whole_model_state(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP the network's whole state dict on the main process (collective), else None: it is whole."""
        return fsdp.gather_model_state(self.family.trainable_module()) if self.fsdp else None

    def _gather_states(self) -> tuple[dict, dict]:
        """(trainable weights, optimizer state) for a checkpoint, whole, on the main process (empty on the others)."""
        if not self.fsdp:
            main = self.accelerator.is_main_process
            return (self.family.trainable_state(), self.optimizer.state_dict()) if main else ({}, {})
        model = self._whole_model_state()
        optimizer = fsdp.gather_optimizer_state(self.family.trainable_module(), self.optimizer.optimizer)
        return (self.family.trainable_state(model) if self.accelerator.is_main_process else {}), optimizer

    def _load_states(self, weights: dict[str, torch.Tensor], optimizer: dict, path: Path) -> None:
        """Restore trainable weights and optimizer state (sharded into place under FSDP)."""
        require_same_optimizer_layout(optimizer, fsdp=self.fsdp, path=path)
        if not self.fsdp:
            self.family.load_trainable_state({k: v.to(self.accelerator.device) for k, v in weights.items()})
            self.optimizer.load_state_dict(optimizer)
            return
        module = self.family.trainable_module()
        fsdp.load_model_state(module, self.family.model_state(weights))
        fsdp.load_optimizer_state(module, self.optimizer.optimizer, optimizer)

    def _resume(self, which: str) -> None:
        """Restore weights, optimizer, LR schedule, RNG and counters from ``latest`` or a checkpoint folder."""
        path = checkpoint.latest_checkpoint(self.out / "checkpoints") if which == "latest" else Path(which)
        if path is None:
            log.warning("train.resume=latest: no complete checkpoint in %s; starting from step 0", self.out / "checkpoints")
            return
        state = checkpoint.load_checkpoint(path)
        self._load_states(state["weights"], state["optimizer"], path)
        self.lr_scheduler.load_state_dict(state["scheduler"]["lr_scheduler"])
        torch.set_rng_state(state["scheduler"]["torch_rng"])
        counters = state["state"]
        self.global_step = int(counters["step"])
        self.guard.skipped = int(counters.get("skipped", 0))
        self.guard.scaler_skipped = int(counters.get("scaler_skipped", 0))
        if self.accelerator.scaler and "scaler" in counters:
            self.accelerator.scaler.load_state_dict(counters["scaler"])
        self._stream_resume = counters.get("stream")
        if self.shards:
            acc = self.accelerator
            self.stream.keep(self._stream_resume, path, process=acc.process_index, processes=acc.num_processes,
                             workers=max(self.cfg.data.num_workers, 1))
        self.micro_step = self.global_step * self.cfg.train.grad_accum
        self.objective.load_state_dict(counters.get("reference"))  # None: Q_ref re-estimated at once
        if self.accelerator.is_main_process:
            print(f"resumed from {path} at step {self.global_step}")
