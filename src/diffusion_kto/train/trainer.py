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
from ..data import Batch, FeedbackDataset, build_sampler, collate
from ..data.cache import CacheError, LatentCache, row_prompts
from ..data.pairs import PairDataset, collate_pairs, feedback_to_pairs
from ..data.stream import StreamingFeedbackDataset, check_readers, collate_stream
from ..models import DiffusionFamily, load_family
from ..models.base import Conditioning
from ..objectives import build_objective, prompt_groups
from . import checkpoint, rng
from .distributed import fsdp, require_same_optimizer_layout, setup_accelerator, zero
from .guards import StepGuard, window_problem
from .inputs import DTYPES, load_feedback, open_stream, write_data_report
from .metrics import MetricsFile, TrainResult, flat_config, postfix, reduce_window, require_tracker, write_summary
from .model_card import CARD_GRID, RunFacts, card_prompts, write_model_card
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
        self.window_bad: list[int] = []  # micro-steps (1-based) of the current accumulation window that were non-finite
        self.window: list[dict[str, float]] = []  # metrics of the micro-steps since the last log row (checkpointed)
        self.stream_skipped: int | None = None  # data.streaming: bad rows its readers skipped (data.on_bad_row=skip)
        self.card_grid: Path | None = None  # the model card's sample grid
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
                resume=self._stream_resume, source=cfg.data.path, skip_bad=cfg.data.on_bad_row == "skip",
                columns=(cfg.data.image_column, cfg.data.prompt_column, cfg.data.label_column), **transform,
            ), collate_stream
        else:
            if self.objective.paired:  # the pairs of paired data as given, else formed from same-prompt rows
                pairs = getattr(self.screened, "pairs", None) or \
                    feedback_to_pairs(self.rows, cfg.data.max_pairs_per_prompt, seed=cfg.train.seed)
                dataset, collate_fn = PairDataset(pairs, cache=self.cache, **transform), collate_pairs
                desirable, prompts = [True] * len(pairs), None  # the sampler draws pairs
            else:
                dataset, collate_fn = FeedbackDataset(self.rows, cache=self.cache, **transform), collate
                desirable, prompts = [r.desirable for r in self.rows], [r.prompt for r in self.rows]
            sampler = build_sampler(desirable, prompts, ratio, self.objective.pair_share, seed=cfg.train.seed,
                                    batch_size=cfg.train.batch_size, rank=acc.process_index,
                                    world_size=acc.num_processes, start_step=start_step)
        return torch.utils.data.DataLoader(
            dataset, batch_size=cfg.train.batch_size, sampler=sampler, collate_fn=collate_fn,
            num_workers=cfg.data.num_workers, pin_memory=acc.device.type == "cuda",
            persistent_workers=cfg.data.num_workers > 0,
            generator=torch.Generator().manual_seed(cfg.train.seed),  # its workers' seeds: not from the global RNG
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
        if not finite:  # the whole accumulation window will be skipped (optimizer_step)
            self.window_bad.append(self.micro_step % self.cfg.train.grad_accum + 1)
        if not self.window_bad:
            acc.backward(loss)
        elif acc.sync_gradients and not self.deepspeed:
            # a gradient-synchronising forward must be followed by a backward (DDP's reducer and FSDP's hooks wait for
            # it); its gradients are dropped with the window's. DeepSpeed gets a NaN one at the boundary instead.
            acc.backward(loss * 0.0)
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
        """Clip, step and zero the optimizer at accumulation boundaries (after a backward). A window with a non-finite
        micro-step, or a non-finite gradient norm (checked with clipping off too), is skipped whole and counted.
        Returns True when an optimizer step was taken."""
        acc = self.accelerator
        if not acc.sync_gradients:
            return False
        bad, self.window_bad = self.window_bad, []
        why = window_problem(bad, self.cfg.train.grad_accum)
        if self.deepspeed:
            return self._deepspeed_step(result, why)
        if not bad:  # max_grad_norm 0: clip at infinity, which still computes the norm (and unscales under fp16)
            norm = acc.clip_grad_norm_(self.family.trainable_parameters(), self.cfg.optim.max_grad_norm or math.inf)
            result.metrics["grad_norm"] = float(norm)
            # fp16: an overflow of the *scaled* gradients is the scaler's to handle (its step skips and backs off)
            why = "non-finite gradient norm" if not math.isfinite(float(norm)) and acc.scaler is None else None
        if why:
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.bad_step(self.global_step + 1, why)
            return False
        self.optimizer.step()
        if self.optimizer.step_was_skipped:  # fp16: the scaler found inf/NaN gradients and lowered its scale
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.overflow_step(self.global_step + 1, acc.scaler.get_scale())
            return False
        self._stepped(result)
        return True

    def _deepspeed_step(self, result: StepOutput, why: str | None) -> bool:
        """The accumulation boundary under DeepSpeed, whose engine has clipped (optim.max_grad_norm) and stepped inside
        ``accelerator.backward``, or skipped the step and zeroed the gradients when their norm was not finite (ZeRO-2,
        fp32). A window with a non-finite micro-step ran no backward at its boundary; a NaN one is run instead, so that
        the engine discards the window's earlier gradients the same way. Either skip is counted as under DDP."""
        engine = self.family.trainable_module()
        if why:
            self.accelerator.backward(zero.poison(self.family.trainable_parameters()))
        norm = engine.get_global_grad_norm()  # None only with zero_optimization.compute_grad_norm=false
        result.metrics["grad_norm"] = math.nan if norm is None else float(norm)
        if self.optimizer.step_was_skipped:
            self.guard.bad_step(self.global_step + 1, why or "non-finite gradient norm")
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
        loader = iter(self.loader(self.micro_step))  # global_step x grad_accum unless windows were skipped
        bar = tqdm(total=cfg.train.max_steps, initial=self.global_step, desc="train",
                   disable=not acc.is_local_main_process)
        start, start_step, waited = time.perf_counter(), self.global_step, 0.0
        while self.global_step < cfg.train.max_steps:
            for _ in range(cfg.train.grad_accum):
                fetch = time.perf_counter()
                batch = next(loader)
                wait = time.perf_counter() - fetch
                waited += wait
                result = self.step(batch)
                self.window.append({**result.metrics, "data_wait_ms": wait * 1000})
            if not result.stepped:
                continue
            self.global_step += 1
            bar.update(1)
            if self.global_step % cfg.log.every == 0 or self.global_step == cfg.train.max_steps:
                bar.set_postfix(postfix(self._log(self.window)))
                if self.global_step % cfg.log.every == 0:  # a run's last row keeps them for a checkpoint (resume)
                    self.window = []
            self._every(cfg.log.validation_every, self.write_validation_images)
            self._every(cfg.train.checkpoint_every, self.save_checkpoint)
        bar.close()
        seconds = time.perf_counter() - start
        self.stream_skipped = sum(self.stream.state()["skipped"].values()) if self.shards else None  # collective
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
        metrics = {**reduce_window(self.accelerator, window), "skipped_steps": float(self.guard.skipped),
                   "nonfinite_micro_steps": float(sum(not m.get("finite", 1.0) for m in window))}
        self.metrics_file.write(self.global_step, metrics)
        if self.cfg.log.report_to != "none":
            self.accelerator.log(metrics, step=self.global_step)
        return metrics

    def write_summary(self, result: TrainResult) -> None:
        """``summary.json`` and the model card ``README.md`` of a finished run (main process)."""
        stream = {} if self.stream_skipped is None else {"stream_skipped_rows": self.stream_skipped}
        write_summary(self.out, result, scaler_skipped_steps=self.guard.scaler_skipped,
                      cached_latents=self.cache is not None, cached_text=self.text_cache is not None, **stream)
        rows = None if self.rows is None else (sum(r.desirable for r in self.rows), sum(not r.desirable for r in self.rows))
        if result.main_process:
            write_model_card(self.out, self.cfg, RunFacts(
                result.steps, result.exported, self.accelerator.num_processes, result.data, rows, self.stream_skipped,
                self.card_grid, result.skipped_steps))

    def _finish(self) -> list[str]:
        """Final checkpoint (if checkpointing is on), validation images, and the diffusers export."""
        acc, cfg = self.accelerator, self.cfg
        if cfg.train.checkpoint_every and self.global_step % cfg.train.checkpoint_every:
            self.save_checkpoint()
        if cfg.log.validation_every and self.global_step % cfg.log.validation_every:
            self.write_validation_images()
        self.card_grid = self._card_grid()
        model_state = self._whole_model_state()
        exported = self.family.export(str(self.out), model_state) if acc.is_main_process else []
        acc.wait_for_everyone()
        acc.end_training()
        return exported

    def _card_grid(self) -> Path | None:
        """The model card's sample grid: the last validation grid, else one drawn now (collective under FSDP)."""
        cfg = self.cfg
        if cfg.log.validation_every and cfg.log.validation_prompts:
            return self.out / "validation" / f"step-{self.global_step:08d}.png"
        prompts = card_prompts(cfg, self.rows, self._components())
        return self.write_validation_images(prompts, self.out / CARD_GRID) if prompts else None

    def write_validation_images(self, prompts: list[str] | None = None, path: Path | None = None) -> Path | None:
        """Policy and reference images for log.validation_prompts (or ``prompts``, into ``path``) with the same seeds,
        side by side."""
        from ..sampling import generate_pair_grid

        cfg, acc = self.cfg, self.accelerator
        prompts = cfg.log.validation_prompts if prompts is None else prompts
        if not prompts or not (acc.is_main_process or self.fsdp):
            return None  # under FSDP every process samples: each forward gathers the network's shards from all of them
        prompts = [self.objective.sampling_prompt(p) for p in prompts]
        with acc.autocast():  # bf16 / fp16: the VAE and text encoder hold the compute dtype, the trained network fp32
            grid = generate_pair_grid(self.family, prompts, seed=cfg.train.seed, steps=cfg.log.validation_steps,
                                      guidance=cfg.log.validation_guidance, resolution=cfg.data.resolution)
        if not acc.is_main_process:
            return None
        path = path or self.out / "validation" / f"step-{self.global_step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path

    # ---------------------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint (main process), atomically; every process waits for it."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        stream = self.stream.state() if self.shards else None  # collective
        weights, optimizer = self._gather_states()
        processes = gather_object([{"rng": rng.capture(), "window": self.window}])  # collective: every process's
        path = None
        if acc.is_main_process:
            path = checkpoint.save_checkpoint(
                self.out / "checkpoints", self.global_step, weights=weights, optimizer=optimizer,
                scheduler={"lr_scheduler": self.lr_scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                           "processes": processes},
                state=self._counters(stream), config=to_dict(self.cfg), keep=self.cfg.train.keep_checkpoints,
            )
        acc.wait_for_everyone()
        return path

    def _counters(self, stream: dict | None) -> dict:
        """The JSON state of a checkpoint: step, skip counts, the objective's state, stream position, fp16 scaler."""
        scaler = self.accelerator.scaler
        return {"step": self.global_step, "micro_step": self.micro_step, "skipped": self.guard.skipped,
                "scaler_skipped": self.guard.scaler_skipped,
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
        self.window = rng.restore_processes(state["scheduler"], self.accelerator)
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
        self.micro_step = int(counters.get("micro_step", self.global_step * self.cfg.train.grad_accum))
        self.objective.load_state_dict(counters.get("reference"))  # None: Q_ref re-estimated at once
        if self.accelerator.is_main_process:
            print(f"resumed from {path} at step {self.global_step}")
