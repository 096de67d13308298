"""`dkto bench step`: time and size one training step of SFT, Diffusion-KTO and Diffusion-DPO on the same model and
images.

Every (adapter, loss) mode runs in fresh subprocesses, so that nothing carries over from one mode to the next. A
worker builds the real :class:`~diffusion_kto.train.DiffusionKTOTrainer` on synthetic feedback, draws its batches
from the trainer's own loader beforehand (image decoding is not timed), and times ``warmup`` + ``steps`` calls of
``trainer.step`` (forward, backward and the optimizer step). Times: the median over the timed steps of ``repeats``
rounds.

Memory comes from one more worker per mode. On CUDA: ``torch.cuda.max_memory_allocated``. On CPU, its analogue:
the weights of every module (policy, reference copy, VAE, text encoder) plus the rise of the resident set from
"weights loaded" to its high-water mark over the training steps (the mark is reset through
``/proc/self/clear_refs`` once the weights are loaded; where that is not possible, ``getrusage`` max RSS, which then
includes loading). glibc is told to return freed blocks of 64 KiB and more to the system, so that the resident set
follows the live tensors rather than the allocator's cache. ``train_mb`` is that rise alone: optimizer state,
gradients, batches and activations.

``kto_amortized`` is the paper's mismatched reference point estimated every ``AMORTIZED_EVERY`` micro-steps
(running mean in between, ``loss.reference_decay``): one step in k is dear (it estimates Q_ref), the others are
cheap, so its time is (median of the dear steps + (k - 1) x median of the cheap ones) / k (the same for the
quartiles): the per-step cost averaged over a period, with the same robustness to the shared machine's spikes as
the plain medians of the other modes (a mean over windows of k steps would pick up every spike).

``--end-to-end`` times whole ``dkto train`` runs instead (subprocesses: model loading, data loading and decoding,
encoding, logging and export included) without and with ``data.cache``, and reports trained images per second
(of the training loop, and of the whole command) and the share of the loop spent waiting on data. Beside them, for
each adapter of ``official``, the official script's step design (:mod:`diffusion_kto.apps.bench_official`: VAE and text
encoding every step, the reference weights swapped in from the CPU) and ours, uncached and cached, on the same
model, data and loss (kto, matched reference point: the script's default), in the same interleaved rounds, with
the ratio ours / official of loop images per second (the target, ``OFFICIAL_TARGET``: >= 3 once cached).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..config import ConfigError
from ..objectives import objective_class
from .bench_inputs import cache_path, native_resolution, pairs_path, write_cache, write_feedback, write_pairs_data

# (name, loss overrides): the losses compared; ratios are taken to "sft". A paired objective (dpo) trains on the pairs
# formed from the same feedback (a pairs.jsonl, as `dkto convert to-pairs` writes it), batch_size / 2 pairs a step:
# the same images per step as the others
LOSSES = {
    "sft": {"loss.name": "sft"},
    "kto_matched": {"loss.name": "kto", "loss.reference_point": "matched"},
    "kto_mismatched": {"loss.name": "kto", "loss.reference_point": "mismatched"},
    "kto_amortized": {"loss.name": "kto", "loss.reference_point": "mismatched", "loss.reference_every": 4,
                      "loss.reference_decay": 0.75},
    "dpo": {"loss.name": "dpo"},  # pairs: half as many pairs per step as the others have images (same images)
}
DEFAULT_LOSSES = ("sft", "kto_matched", "kto_mismatched", "kto_amortized")  # what --losses runs unless told
AMORTIZED_EVERY = LOSSES["kto_amortized"]["loss.reference_every"]
# the targets the project holds itself to (time ratios to SFT; LoRA KTO peak memory relative to LoRA SFT)
TARGETS = {"time.kto_matched": 1.38, "time.kto_mismatched": 2.05, "time.kto_amortized": 1.5,
           "lora_peak_mem.kto": 1.05}
# the official script's step design is compared on its own default objective; ours must train >= 3x its images/s
OFFICIAL_LOSS, OFFICIAL_TARGET = "kto_matched", 3.0


@dataclass
class BenchSettings:
    """What to benchmark: model, batch, adapters, and how many steps."""

    model: str = "toy"
    batch_size: int = 4
    resolution: int | None = None  # default: the VAE's sample_size (the model's native resolution)
    adapters: tuple[str, ...] = ("lora", "full")
    lora_rank: int = 4
    steps: int = 20
    warmup: int = 3
    repeats: int = 1  # rounds over all modes; the reported time is the median over every timed step of every round
    memory_steps: int = 3  # steps (after warm-up) of the separate memory run of each mode
    threads: int | None = None  # torch CPU threads per worker (None: torch's default); 1 is steadier on a shared machine
    mixed_precision: str = "no"
    seed: int = 0
    overrides: tuple[str, ...] = field(default_factory=tuple)
    end_to_end: bool = False  # also time whole `dkto train` runs without and with data.cache
    official: tuple[str, ...] = ("full",)  # end to end: adapters on which the official step design is timed beside ours
    losses: tuple[str, ...] = DEFAULT_LOSSES  # the losses compared (names of LOSSES; sft is the baseline of the ratios)
    # train every mode from a `dkto cache` of the feedback (latents and text embeddings): no VAE or text encoder is
    # loaded, as a run on a 24 GB card trains; the cache is built once, in its own process, before the modes
    cached: bool = False


def _rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc, else getrusage)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _maxrss_mb()


def _maxrss_mb() -> float:
    """getrusage max RSS of this process in MiB (kB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def paired(loss: str) -> bool:
    """Whether a mode's objective trains on pairs (its objective says so)."""
    return objective_class(LOSSES[loss]["loss.name"]).paired


def mode_overrides(s: BenchSettings, adapter: str, loss: str, data: Path, out: Path, resolution: int) -> list[str]:
    """Config overrides of one benchmark mode; everything but the adapter and the loss (and, for a paired loss, the
    pairs data and batch_size / 2 pairs: the same images a step) is shared; with ``s.cached``, the feedback's cache."""
    pairs = paired(loss)
    values = {
        "model.pretrained": s.model, "data.path": str(pairs_path(data) if pairs else data),
        "data.resolution": resolution, "data.caption_dropout": 0.0, "data.random_flip": False,
        "train.output_dir": str(out), "train.batch_size": s.batch_size // 2 if pairs else s.batch_size,
        "train.max_steps": s.warmup + s.steps, "train.checkpoint_every": 0,
        "train.mixed_precision": s.mixed_precision, "train.seed": s.seed, "optim.warmup_steps": 0,
        "optim.lr": 1e-5, "lora.rank": s.lora_rank if adapter == "lora" else 0, **LOSSES[loss],
        **({"data.cache": str(cache_path(data))} if s.cached else {}),
    }
    return [f"{k}={_yaml_scalar(v)}" for k, v in values.items()] + list(s.overrides)


def _yaml_scalar(value) -> str:
    """An override value that YAML reads back as itself (a bare `no` is false, a bare `1e-05` a string)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return format(value, ".12f").rstrip("0")
    return str(value)


def run_worker(overrides: list[str], warmup: int, steps: int, threads: int | None = None) -> dict:
    """In this (fresh) process: build the trainer, run warm-up and timed steps, return times and memory."""
    import gc

    import torch

    from ..config import load_config
    from ..train import DiffusionKTOTrainer

    if threads:
        torch.set_num_threads(threads)
    trainer = DiffusionKTOTrainer(load_config(None, overrides))
    acc = trainer.accelerator
    cuda = acc.device.type == "cuda"
    gc.collect()
    loaded_mb = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    exact = True
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        exact = _reset_peak_rss()  # drop the transient peak of loading the weights
    loader = iter(trainer.loader())
    batches = [next(loader) for _ in range(warmup + steps + 1)]
    times = []
    for batch in batches[:-1]:
        start = time.perf_counter()
        trainer.step(batch)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _maxrss_mb()
    return {
        "step_flops": step_flops(trainer, batches[-1]),
        "step_ms": [t * 1000 for t in times[warmup:]],
        "peak_mb": peak_mb if cuda else weights_mb(trainer.family) + peak_mb - loaded_mb,
        "train_mb": peak_mb - loaded_mb,
        "weights_mb": weights_mb(trainer.family),
        "peak_rss_reset": exact,
        "device": str(acc.device),
        "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in trainer.family.trainable_parameters()),
        "skipped_steps": trainer.guard.skipped,
    }


def step_flops(trainer, batch) -> int:
    """The FLOPs of one more training step (forward, backward, optimizer), counted by torch's FlopCounterMode over
    the aten ops it knows (matmuls, convolutions, attention): the numerator of the model FLOPs utilisation."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.step(batch)
    return int(counter.get_total_flops())


def weights_mb(family) -> float:
    """MiB of every distinct parameter and buffer held by the family's modules (policy, reference, VAE, text)."""
    from torch import nn

    seen: dict[int, int] = {}
    for module in vars(family).values():
        if isinstance(module, nn.Module):
            for t in [*module.parameters(), *module.buffers()]:
                seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values()) / 2**20


def _spawn(overrides: list[str], warmup: int, steps: int, threads: int | None, memory: bool) -> dict:
    """Run :func:`run_worker` in a fresh interpreter and return its JSON result.

    A memory run makes glibc malloc hand every block of 64 KiB or more straight back to the system when freed, so
    that the resident set follows the live tensors instead of the allocator's cache (this slows the steps, which
    is why times come from separate runs)."""
    spec = json.dumps({"overrides": overrides, "warmup": warmup, "steps": steps, "threads": threads})
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if memory:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", MALLOC_ARENA_MAX="1")
    proc = subprocess.run([sys.executable, "-m", "diffusion_kto.apps.bench_step", spec], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({' '.join(overrides)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _quartiles(times: list[float]) -> list[float]:
    """q1, median, q3 of step times (one time: itself three times)."""
    return statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3


def phase_quartiles(timed: list[dict], every: int, first: int) -> list[float]:
    """q1, median, q3 of the pooled step times; with every = k > 1, (dear + (k - 1) cheap) / k of each quartile.

    Timed step j of a run is micro-step first + j; it is dear (estimates Q_ref) when that is a multiple of k."""
    if every == 1:
        return _quartiles([t for r in timed for t in r["step_ms"]])
    phases = [[t for r in timed for j, t in enumerate(r["step_ms"]) if ((first + j) % every == 0) == dear]
              for dear in (True, False)]
    dear, cheap = (_quartiles(p) for p in phases)
    return [(d + (every - 1) * c) / every for d, c in zip(dear, cheap)]


def _summary(timed: list[dict], memory: dict, every: int = 1, first: int = 0) -> dict:
    """Median and quartiles of the pooled step times (per period of ``every`` steps); memory from the memory run."""
    q = phase_quartiles(timed, every, first)
    return {
        "step_ms_median": round(q[1], 3),
        "step_ms_q1": round(q[0], 3),
        "step_ms_q3": round(q[2], 3),
        "timed_steps": sum(len(r["step_ms"]) for r in timed),
        "peak_mb": round(memory["peak_mb"], 1),
        "train_mb": round(memory["train_mb"], 1),
        "weights_mb": round(memory["weights_mb"], 1),
        "peak_rss_reset": memory["peak_rss_reset"],
        "trainable_params": memory["trainable_params"],
        "skipped_steps": sum(r["skipped_steps"] for r in timed),
        "step_flops": timed[0].get("step_flops"),  # one counted step (every = k > 1: a dear or a cheap one)
    }


def ratios(results: dict) -> dict:
    """Time and memory ratios of every loss to SFT, per adapter."""
    out: dict = {}
    for adapter, modes in results.items():
        sft = modes["sft"]
        out[adapter] = {
            loss: {
                "time": round(m["step_ms_median"] / sft["step_ms_median"], 3),
                "peak_mem": round(m["peak_mb"] / sft["peak_mb"], 3),
                "train_mem": round(m["train_mb"] / sft["train_mb"], 3) if sft["train_mb"] > 0 else None,
            }
            for loss, m in modes.items() if loss != "sft"
        }
    return out


def check_targets(rat: dict) -> dict:
    """Each target with the measured ratio and whether it is met (per adapter for the time targets)."""
    checks = {}
    for adapter, modes in rat.items():
        for loss in ("kto_matched", "kto_mismatched", "kto_amortized"):  # the targets are KTO's
            if loss in modes:
                value, limit = modes[loss]["time"], TARGETS[f"time.{loss}"]
                checks[f"{adapter}.time.{loss}"] = {"ratio": value, "limit": limit, "met": value <= limit}
    for loss, m in rat.get("lora", {}).items():
        if not loss.startswith("kto"):
            continue
        value, limit = m["peak_mem"], TARGETS["lora_peak_mem.kto"]
        checks[f"lora.peak_mem.{loss}"] = {"ratio": value, "limit": limit, "met": value <= limit}
    return checks


def _check_settings(s: BenchSettings) -> None:
    """ConfigError for settings no benchmark can run with."""
    from ..models import resolve_pretrained

    if s.steps < AMORTIZED_EVERY or s.warmup < 0 or s.repeats < 1 or s.memory_steps < 1:
        raise ConfigError(f"bench step needs steps >= {AMORTIZED_EVERY} (kto_amortized estimates Q_ref on one step "
                          f"in {AMORTIZED_EVERY}), warmup >= 0, repeats >= 1 and memory_steps >= 1")
    if "sft" not in s.losses or set(s.losses) - set(LOSSES):
        raise ConfigError(f"bench step: losses must be among {', '.join(LOSSES)} and include sft (the baseline), "
                          f"got {', '.join(s.losses) or 'none'}")
    if s.batch_size < 2 or s.batch_size % 2:
        raise ConfigError(f"bench step: --batch-size must be even (the dpo mode trains batch_size / 2 pairs: the same "
                          f"images a step as the others), got {s.batch_size}")
    if not s.adapters or set(s.adapters) - {"lora", "full"} or set(s.official) - {"lora", "full"}:
        raise ConfigError(f"bench step: adapters must be lora and/or full, got {', '.join(s.adapters) or 'none'} "
                          f"(official: {', '.join(s.official) or 'none'})")
    if s.cached and any(paired(loss) for loss in s.losses):
        raise ConfigError("bench step --cached: a cache is keyed by the rows of per-image feedback; the dpo mode trains "
                          "on pairs, so leave it out of --losses")
    if s.model == "toy" and not (Path(resolve_pretrained(s.model)) / "model_index.json").is_file():
        raise ConfigError("the shipped toy model is missing (src/diffusion_kto/toy/weights); "
                          "pass --model PATH to a diffusers folder, or run `dkto toy pretrain` first")


def bench_step(s: BenchSettings, progress=None) -> dict:
    """Benchmark every (adapter, loss) mode in fresh subprocesses; returns the JSON-ready report."""
    import torch

    _check_settings(s)
    resolution = s.resolution or native_resolution(s.model)
    modes = [(adapter, loss) for adapter in s.adapters for loss in s.losses]
    timed: dict[tuple[str, str], list[dict]] = {m: [] for m in modes}
    memory: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="dkto-bench-") as tmp:
        data = write_feedback(Path(tmp) / "data", resolution, seed=s.seed)
        write_pairs_data(data)
        if s.cached:
            if progress:
                progress("dkto cache of the benchmark's feedback")
            base = replace(s, cached=False)
            write_cache(mode_overrides(base, "lora", "sft", data, Path(tmp) / "cache-run", resolution), data)

        def run(adapter: str, loss: str, tag: str, steps: int, is_memory: bool) -> dict:
            """One worker subprocess of one mode."""
            if progress:
                progress(f"{tag}: {adapter} {loss}")
            args = mode_overrides(s, adapter, loss, data, Path(tmp) / f"{tag}-{adapter}-{loss}", resolution)
            return _spawn(args, s.warmup, steps, s.threads, is_memory)

        for r in range(s.repeats):  # rounds over all modes, so that a slow spell of the machine hits every mode
            for adapter, loss in modes:
                timed[(adapter, loss)].append(run(adapter, loss, f"time{r + 1}", s.steps, False))
        for adapter, loss in modes:
            memory[(adapter, loss)] = run(adapter, loss, "memory", s.memory_steps, True)
    every = {loss: o.get("loss.reference_every", 1) for loss, o in LOSSES.items()}
    results = {a: {loss: _summary(timed[(a, loss)], memory[(a, loss)], every[loss], s.warmup) for loss in s.losses}
               for a in s.adapters}
    rat = ratios(results)
    first = memory[modes[0]]
    return {
        "settings": {**asdict(s), "resolution": resolution},
        "machine": {"device": first["device"], "torch": torch.__version__, "threads": first["threads"],
                    "cpu_count": os.cpu_count()},
        "results": results,
        "ratios_to_sft": rat,
        "targets": check_targets(rat),
        **({"end_to_end": bench_end_to_end(s, progress=progress)} if s.end_to_end else {}),
    }


def bench_end_to_end(s: BenchSettings, adapter: str = "lora", loss: str = "kto_mismatched", rows: int = 64,
                     progress=None) -> dict:
    """Whole runs of ``warmup + steps`` steps, ``repeats`` interleaved rounds of every mode of :func:`e2e_modes`.

    The cache is built once beforehand (its time is reported apart: a one-off per dataset and model)."""
    from ..config import load_config
    from ..train.precompute import build_cache

    _check_settings(s)
    resolution = s.resolution or native_resolution(s.model)
    modes = e2e_modes(adapter, loss, s.official)
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory(prefix="dkto-bench-e2e-") as tmp:
        data, cache = write_feedback(Path(tmp) / "data", resolution, n=rows, seed=s.seed), Path(tmp) / "cache"
        start = time.perf_counter()
        build_cache(load_config(None, mode_overrides(s, adapter, loss, data, Path(tmp) / "unused", resolution)), cache,
                    progress=None)
        cache_seconds = time.perf_counter() - start
        for r in range(s.repeats):
            names = list(modes)[r % len(modes):] + list(modes)[:r % len(modes)]  # rotated: no mode always runs first
            for name in names:
                if progress:
                    progress(f"end-to-end round {r + 1}: {name}")
                runner, mode_adapter, mode_loss, cached = modes[name]
                out = Path(tmp) / f"{name}-{r}"
                overrides = mode_overrides(s, mode_adapter, mode_loss, data, out, resolution)
                runs[name].append(_spawn_run(runner, overrides + ([f"data.cache={cache}"] if cached else []), out,
                                             s.threads, s.warmup))
    summary = {name: _e2e_summary(r) for name, r in runs.items()}
    return {"adapter": adapter, "loss": loss, "rows": rows, "steps": s.warmup + s.steps,
            "images_per_run": (s.warmup + s.steps) * s.batch_size, "cache_build_s": round(cache_seconds, 2),
            "no_cache": summary["no_cache"], "cache": summary["cache"],
            "cache_speedup": round(summary["cache"]["images_per_s"] / summary["no_cache"]["images_per_s"], 3),
            **({"official": official_comparison(summary, s.official)} if s.official else {})}


def e2e_modes(adapter: str, loss: str, official: tuple[str, ...]) -> dict[str, tuple[str, str, str, bool]]:
    """name -> (runner, adapter, loss, cached): ours without and with data.cache on (adapter, loss), and for each
    adapter of ``official`` the official step design beside ours, uncached and cached, on :data:`OFFICIAL_LOSS`."""
    modes = {"no_cache": ("train", adapter, loss, False), "cache": ("train", adapter, loss, True)}
    for a in official:
        modes.update({f"official.{a}": ("official", a, OFFICIAL_LOSS, False),
                      f"ours.{a}.no_cache": ("train", a, OFFICIAL_LOSS, False),
                      f"ours.{a}.cache": ("train", a, OFFICIAL_LOSS, True)})
    return modes


def official_comparison(summary: dict, official: tuple[str, ...]) -> dict:
    """Per adapter: the official design's and our end-to-end numbers, and ours / official in loop images per second."""
    out: dict = {"loss": OFFICIAL_LOSS, "target_min": OFFICIAL_TARGET}
    for a in official:
        base = summary[f"official.{a}"]
        ours = {c: summary[f"ours.{a}.{c}"] for c in ("no_cache", "cache")}
        ratio = {c: round(m["images_per_s"] / base["images_per_s"], 3) for c, m in ours.items()}
        out[a] = {"official": base, "ours_no_cache": ours["no_cache"], "ours_cache": ours["cache"],
                  "ours_over_official": ratio, "met": ratio["cache"] >= OFFICIAL_TARGET}
    return out


# how each runner of an end-to-end mode is started: `dkto train`, or the official step design's worker
_RUNNERS = {"train": ["diffusion_kto.cli", "train"], "official": ["diffusion_kto.apps.bench_official"]}


def _spawn_run(runner: str, overrides: list[str], out: Path, threads: int | None, warmup: int) -> dict:
    """One end-to-end run subprocess; its summary.json plus the wall time of the whole command."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    extra = [f"--warmup={warmup}"] if runner == "official" else []
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *_RUNNERS[runner], *extra, *overrides], capture_output=True,
                          text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{runner} run failed ({' '.join(overrides)}):\n{proc.stderr[-3000:]}")
    return {**json.loads((out / "summary.json").read_text()), "wall_s": wall}


def _e2e_summary(runs: list[dict]) -> dict:
    """Medians over the rounds: loop images/s, whole-command images/s, data-wait share (and the official design's
    after-warm-up images/s, step time and per-part times)."""
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    images = runs[0]["images_per_second"] * runs[0]["seconds"]
    out = {"images_per_s": round(med("images_per_second"), 3), "command_images_per_s": round(images / med("wall_s"), 3),
           "command_s": round(med("wall_s"), 2), "data_wait_share": round(med("data_wait_share"), 4),
           "data_wait_s": round(med("data_wait_seconds"), 3), "rounds": len(runs)}
    if "parts_ms" in runs[0]:
        out.update(images_per_s_after_warmup=round(med("images_per_second_after_warmup"), 3),
                   step_ms_median=round(med("step_ms_median"), 3),
                   parts_ms={k: round(statistics.median(r["parts_ms"][k] for r in runs), 3) for k in runs[0]["parts_ms"]})
    return out


def main(argv: list[str]) -> int:
    """Worker entry point: ``python -m diffusion_kto.apps.bench_step '<json spec>'`` prints one JSON line."""
    spec = json.loads(argv[0])
    print(json.dumps(run_worker(spec["overrides"], spec["warmup"], spec["steps"], spec.get("threads"))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
