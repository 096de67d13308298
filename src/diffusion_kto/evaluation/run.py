"""`dkto eval`: paired generation, scoring, the paper's win rates, and a report (Diffusion-KTO §5, App. B).

Models are written ``NAME=BASE[+lora:DIR | +unet:DIR | +DIR]``:

* ``BASE``: a hub id, a local diffusers pipeline folder, or ``toy`` (the shipped shapes-world model).
* ``+lora:DIR``: a folder holding ``pytorch_lora_weights.safetensors`` (what ``dkto train`` exports with LoRA).
* ``+unet:DIR``: a diffusers UNet folder, or a run folder with ``unet/`` inside (a full fine-tune's export).
* ``+DIR``: either of the two, recognised from the folder's contents.

Every model draws N images per prompt with the same seeds (``seed + 1000 · prompt_index + k``), so comparisons
are paired, and a later run with more prompts or a larger N reuses every image already made. Images land in ``OUT/images/<model>/p<prompt index>_s<seed>.png`` and are reused when the command runs
again; ``generation.json`` beside them records the model, sampler, steps, guidance and resolution, and a run
with different settings stops rather than mixing images. Scores are cached per model and metric in
``OUT/scores/`` and recomputed when any image changed.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..images import image_grid, thumbnail
from ..provenance import commit, machine
from . import report as report_lib
from . import winrate
from .prompts import PromptSet, load_prompts
from .scorers import Metric, parse_metrics, resolve_device
from .specs import EvalError, ModelSpec

TOY_SAMPLING = {"steps": 20, "guidance": 3.0, "resolution": 32}  # the demo's sampling (apps/demo.py SAMPLING)
# the shipped shapes-world models, sampled like their demos (apps/demo.py MODELS)
TOY_MODELS = {"toy": TOY_SAMPLING, "toy-flow": {"steps": 20, "guidance": 1.0, "resolution": 32}}
DEFAULT_SAMPLING = {"steps": 50, "guidance": 7.5, "resolution": None}
SEED_STRIDE = 1000  # seeds of prompt i are seed + SEED_STRIDE * i + k, so N is at most SEED_STRIDE


# ---------------------------------------------------------------- settings

@dataclass
class EvalSettings:
    """Everything one `dkto eval` run needs; defaults follow the paper (N = 5, first model vs the others)."""

    models: list[ModelSpec]
    out: Path
    prompts: str = "toy"
    metrics: Sequence[str] = ("toy:preference",)
    metric_options: Sequence[str] = ()
    num_prompts: int | None = None
    images_per_prompt: int = 5
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    resolution: int | None = None
    batch_size: int = 8
    score_batch_size: int = 32
    device: str | None = None
    dtype: str = "float32"  # generation precision; float16 / bfloat16 halve GPU time and memory
    focus: str | None = None  # None: the first model against each other one (Table 1 layout)
    all_pairs: bool = False
    ci: str = "normal"
    ci_n: str = "prompts"
    grid_prompts: int = 8
    progress: bool = True
    timings: dict = field(default_factory=dict)

    def sampling(self) -> dict:
        """steps, guidance and resolution: given values, else the demo's when every base is the same shipped toy
        model (toy, toy-flow), else 50/7.5."""
        bases = {m.base for m in self.models}
        default = TOY_MODELS[next(iter(bases))] if len(bases) == 1 and bases <= set(TOY_MODELS) else DEFAULT_SAMPLING
        return {"steps": self.steps if self.steps is not None else default["steps"],
                "guidance": self.guidance if self.guidance is not None else default["guidance"],
                "resolution": self.resolution if self.resolution is not None else default["resolution"],
                "dtype": self.dtype}

    def check(self) -> None:
        """EvalError for settings that cannot work, before anything is loaded."""
        if not self.models:
            raise EvalError("no models given")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise EvalError(f"model names must be unique, got {names}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise EvalError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if not 1 <= self.images_per_prompt <= SEED_STRIDE:
            raise EvalError(f"--images-per-prompt must be between 1 and {SEED_STRIDE}")
        if self.focus is not None and self.focus not in names:
            raise EvalError(f"--focus {self.focus!r} is not one of the models {names}")
        if len(self.models) < 2:
            print("[eval] one model: scores and means only, no win rates", file=sys.stderr)
        for m in self.models:
            m.validate()


def seeds_for(n_prompts: int, n: int, seed: int) -> np.ndarray:
    """Seed of image k of prompt i: seed + 1000·i + k, the same for every model and any N: (n_prompts, N)."""
    return seed + np.arange(n_prompts)[:, None] * SEED_STRIDE + np.arange(n)[None, :]


def image_path(folder: Path, prompt_index: int, seed: int) -> Path:
    """Where the image for (prompt index, seed) of one model is stored."""
    return folder / f"p{prompt_index:05d}_s{seed}.png"


# ---------------------------------------------------------------- bookkeeping on disk

def _read_json(path: Path):
    """Parsed JSON or None when the file is missing."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _write_json(path: Path, data) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report_lib.jsonable(data), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_prompts(out: Path, prompts: PromptSet) -> None:
    """Record the prompt list; EvalError if a previous run in this folder used different prompts."""
    file = out / "prompts.json"
    old = _read_json(file)
    if old is not None:
        shared = min(len(old["prompts"]), len(prompts.prompts))
        for i in range(shared):
            if old["prompts"][i] != prompts.prompts[i]:
                raise EvalError(f"{out} holds a run on other prompts (prompt {i}: {old['prompts'][i]!r} there, "
                                f"{prompts.prompts[i]!r} now); choose another --out")
        if len(old["prompts"]) > len(prompts.prompts):
            return  # a shorter prefix of the same prompts: keep the longer record
    _write_json(file, {"name": prompts.name, "source": prompts.source, "prompts": prompts.prompts,
                       "categories": prompts.categories})


def generation_record(spec: ModelSpec, sampling: dict) -> dict:
    """What determines a model's images: the spec, adapter hashes and the sampling settings."""
    return {"model": asdict(spec), "adapter_fingerprint": spec.fingerprint(), **sampling}


def check_generation(folder: Path, record: dict) -> None:
    """EvalError if folder holds images made with other settings; else write the record."""
    old = _read_json(folder / "generation.json")
    if old is not None:
        keep = {k: v for k, v in old.items() if k != "sampler"}
        if keep != report_lib.jsonable(record):
            diff = sorted(k for k in set(keep) | set(record) if keep.get(k) != report_lib.jsonable(record).get(k))
            raise EvalError(f"{folder} holds images generated with different settings ({', '.join(diff)} differ: "
                            f"{ {k: keep.get(k) for k in diff} } there, "
                            f"{ {k: report_lib.jsonable(record).get(k) for k in diff} } now); "
                            "choose another --out, or delete that folder to regenerate")
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "generation.json", {**(old or {}), **record})


def save_png(image: Image.Image, path: Path) -> None:
    """Save a PNG atomically, so that an interrupted run never leaves a half-written image."""
    tmp = path.with_name(path.stem + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------- generation

def generate_model(spec: ModelSpec, prompts: list[str], seeds: np.ndarray, folder: Path, settings: EvalSettings
                   ) -> dict:
    """Generate the missing images of one model (batched, saved as they come); returns counts and the sampler."""
    import torch

    from ..sampling import generate, load_pipeline

    sampling = settings.sampling()
    check_generation(folder, generation_record(spec, sampling))
    todo = [(i, int(s)) for i in range(len(prompts)) for s in seeds[i] if not image_path(folder, i, int(s)).is_file()]
    total = seeds.size
    if not todo:
        return {"generated": 0, "reused": total}
    pipe = load_pipeline(spec.base, lora=spec.lora, unet=spec.unet, device=resolve_device(settings.device),
                         dtype=getattr(torch, sampling["dtype"]))
    record = _read_json(folder / "generation.json")
    record["sampler"] = type(pipe.scheduler).__name__
    _write_json(folder / "generation.json", record)
    bar = tqdm(total=len(todo), desc=f"generate {spec.name}", unit="img", disable=not settings.progress)
    for start in range(0, len(todo), settings.batch_size):
        chunk = todo[start:start + settings.batch_size]
        images = generate(pipe, [prompts[i] for i, _ in chunk], [s for _, s in chunk], steps=sampling["steps"],
                          guidance=sampling["guidance"], resolution=sampling["resolution"],
                          batch_size=settings.batch_size)
        for (i, s), image in zip(chunk, images):
            save_png(image, image_path(folder, i, s))
        bar.update(len(chunk))
    bar.close()
    del pipe
    _free_memory()
    return {"generated": len(todo), "reused": total - len(todo)}


def _free_memory() -> None:
    """Release cached GPU memory between models and scorers."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- scoring

def _stamp(paths: Sequence[Path]) -> list[list]:
    """(name, size, mtime) of each image: a cheap key that changes when an image is regenerated."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def score_model(metric: Metric, fn, prompts: list[str], seeds: np.ndarray, folder: Path, cache: Path,
                settings: EvalSettings) -> tuple[np.ndarray, bool]:
    """(n_prompts, N) scores of one model on one metric, from the cache when its images are unchanged."""
    paths = _paths(folder, seeds)
    key = _score_key(metric, paths)
    cached = _read_json(cache)
    if cached is not None and cached.get("key") == key:
        return np.asarray(cached["scores"], dtype=np.float64).reshape(seeds.shape), True
    flat_prompts = [prompts[i] for i in range(len(prompts)) for _ in seeds[i]]
    out = np.zeros(len(paths))
    step = max(settings.score_batch_size, 1) * 8  # images held in memory at once
    bar = tqdm(total=len(paths), desc=f"score {metric.label} {folder.name}", unit="img",
               disable=not settings.progress)
    for start in range(0, len(paths), step):
        part = slice(start, start + step)
        images = [Image.open(p).convert("RGB") for p in paths[part]]
        values = np.asarray(fn(images, flat_prompts[part]), dtype=np.float64).ravel()
        if values.shape != (len(images),) or not np.all(np.isfinite(values)):
            raise EvalError(f"metric {metric.label!r} returned {values.shape} scores for {len(images)} images "
                            "(or non-finite values)")
        out[part] = values
        bar.update(len(images))
    bar.close()
    cache.parent.mkdir(parents=True, exist_ok=True)
    _write_json(cache, {"key": key, "scores": out.tolist()})
    return out.reshape(seeds.shape), False


def score_all(metrics: list[Metric], prompts: list[str], seeds: np.ndarray, out: Path, settings: EvalSettings
              ) -> tuple[dict, dict]:
    """scores[model][metric] = (n_prompts, N) arrays, loading each scorer once; and cache hits per metric."""
    scores: dict[str, dict[str, np.ndarray]] = {m.name: {} for m in settings.models}
    reused: dict[str, int] = {}
    for metric in metrics:
        caches = {m.name: out / "scores" / m.name / f"{report_lib._slug(metric.label)}.json" for m in settings.models}
        fn = None
        reused[metric.label] = 0
        for model in settings.models:
            if fn is None and not _cache_valid(metric, seeds, out / "images" / model.name, caches[model.name]):
                print(f"[eval] loading metric {metric.label} ...", flush=True)
                fn = metric.load(settings.device)
            values, hit = score_model(metric, fn, prompts, seeds, out / "images" / model.name, caches[model.name],
                                      settings)
            scores[model.name][metric.label] = values
            reused[metric.label] += int(hit)
        del fn
        _free_memory()
    return scores, reused


def _paths(folder: Path, seeds: np.ndarray) -> list[Path]:
    """Image files of one model in (prompt, seed) order."""
    return [image_path(folder, i, int(s)) for i in range(seeds.shape[0]) for s in seeds[i]]


def _score_key(metric: Metric, paths: Sequence[Path]) -> dict:
    """What cached scores must match: the metric and every image's (name, size, mtime), JSON-normalised."""
    return report_lib.jsonable({"metric": metric.describe(), "images": _stamp(paths)})


def _cache_valid(metric: Metric, seeds: np.ndarray, folder: Path, cache: Path) -> bool:
    """Whether the cached scores of one model and metric still match its images."""
    cached = _read_json(cache)
    return cached is not None and cached.get("key") == _score_key(metric, _paths(folder, seeds))


# ---------------------------------------------------------------- report

def build_grids(settings: EvalSettings, prompts: list[str], seeds: np.ndarray, out: Path) -> dict:
    """Two grids: the first prompts at their first seed, and every seed of the first prompt; models as rows."""
    names = [m.name for m in settings.models]
    k = max(1, min(settings.grid_prompts, len(prompts)))

    def load(name: str, i: int, seed) -> Image.Image:
        """One stored image, shrunk for the grid."""
        return thumbnail(Image.open(image_path(out / "images" / name, i, int(seed))).convert("RGB"))

    side = max(load(names[0], 0, seeds[0, 0]).size)
    scale = max(1, 128 // side)
    across = {n: [load(n, i, seeds[i, 0]) for i in range(k)] for n in names}
    labels = [f"{prompts[i]} (seed {seeds[i, 0]})" for i in range(k)]
    per_seed = {n: [load(n, 0, s) for s in seeds[0]] for n in names}
    return {
        "same prompt and seed across models": image_grid(across, labels, scale=scale),
        f"all {seeds.shape[1]} seeds of prompt 0: {prompts[0]}": image_grid(
            per_seed, [f"seed {s}" for s in seeds[0]], scale=scale),
    }


def category_means(prompts: PromptSet, scores: dict) -> dict:
    """{'model · category': {metric: mean}} when the prompt set has categories (the paper's Table 6 layout)."""
    if not prompts.categories:
        return {}
    cats = np.asarray([c if c is not None else "(none)" for c in prompts.categories], dtype=object)
    return {f"{model} · {cat}": {label: float(arr[cats == cat].mean()) for label, arr in per.items()}
            for model, per in scores.items() for cat in dict.fromkeys(cats)}


def comparisons(settings: EvalSettings, scores: dict, metrics: list[Metric]) -> list:
    """Win rates: the focus (default first) model against each other one, or every pair."""
    names = [m.name for m in settings.models]
    if len(names) < 2:
        return []
    lower = [m.label for m in metrics if not m.scorer.higher_is_better]
    if settings.all_pairs:
        return winrate.compare(scores, ci=settings.ci, ci_n=settings.ci_n, lower_is_better=lower)
    return winrate.compare(scores, focus=settings.focus or names[0], ci=settings.ci, ci_n=settings.ci_n,
                           lower_is_better=lower)


def write_eval_report(settings: EvalSettings, prompts: PromptSet, seeds: np.ndarray, metrics: list[Metric],
                      scores: dict, generation: dict, score_reuse: dict) -> dict:
    """results.json, report.md, report.html, grids and histograms; returns the results dict."""
    out = settings.out
    comps = comparisons(settings, scores, metrics)
    means = winrate.mean_scores(scores)
    sampling = settings.sampling()
    samplers = {m.name: (_read_json(out / "images" / m.name / "generation.json") or {}).get("sampler", "?")
                for m in settings.models}
    n = settings.images_per_prompt
    results = {
        "title": "dkto eval",
        "models": {m.name: {"spec": m.describe(), "base": m.base, "lora": m.lora, "unet": m.unet,
                            "sampler": samplers[m.name], **generation[m.name]} for m in settings.models},
        "prompts": {"set": prompts.name, "source": prompts.source, "count": len(prompts)},
        "protocol": {"images_per_prompt": n, "seeds": f"seed + {SEED_STRIDE} * prompt_index + k (k < {n}), same for every model",
                     "seed": settings.seed, **sampling,
                     "win_rate": "per prompt, the median-scored of the N images of each model is compared; "
                                 "ties count half",
                     "ci": settings.ci, "ci_n": settings.ci_n,
                     "pairs": "all" if settings.all_pairs else f"{settings.focus or settings.models[0].name} vs each"},
        "metrics": [m.describe() for m in metrics],
        **winrate.summary(comps, means),
        "scores": {name: {label: arr.tolist() for label, arr in per.items()} for name, per in scores.items()},
        "timings_s": settings.timings,
        "run": {"command": " ".join(["dkto", *sys.argv[1:]]) if sys.argv else "dkto eval", "commit": commit(), "machine": machine()},
    }
    by_cat = category_means(prompts, scores)
    results["category_means"] = by_cat
    notes = [(f"{len(prompts)} prompts from {prompts.source}; {n} images per prompt per model with the same "
              "seeds for every model (paired)."),
             ("Win rate of A over B: per prompt, A's median-scored image against B's; ties count half. "
              f"95% {settings.ci} interval over n = {settings.ci_n} (ci_n='images' reproduces the paper's ± values)."),
             (f"Sampling: {sampling['steps']} steps, guidance {sampling['guidance']}, resolution "
              f"{sampling['resolution'] or 'model default'}, {sampling['dtype']}, "
              f"sampler {', '.join(sorted(set(samplers.values())))}.")]
    info = {"command": results["run"]["command"], "commit": results["run"]["commit"],
            "prompts": f"{prompts.name} ({len(prompts)})", "images per prompt": n, "seed": settings.seed,
            "steps": sampling["steps"], "guidance": sampling["guidance"],
            "resolution": sampling["resolution"] or "model default",
            "models": {m.name: f"{m.describe()} [{samplers[m.name]}]" for m in settings.models},
            "wall time (s)": settings.timings}
    report_lib.write_report(out, title="dkto eval: " + " vs ".join(m.name for m in settings.models),
                            run_info=info, winrates=comps, means=means,
                            extra_tables={"Mean score by prompt category": by_cat} if by_cat else None,
                            grids=build_grids(settings, prompts.prompts, seeds, out), scores=scores,
                            results=results, notes=notes)
    results["_tables"] = {"winrates": winrate.winrate_table(comps).to_markdown() if comps else "",
                          "means": winrate.means_table(means).to_markdown()}
    results["_comparisons"], results["_means"] = comps, means
    return results


# ---------------------------------------------------------------- the run

def run_eval(settings: EvalSettings) -> dict:
    """Generate (reusing images on disk), score, compare, and write the report; returns the results dict."""
    settings.check()
    metrics = parse_metrics(list(settings.metrics), list(settings.metric_options))
    prompts = load_prompts(settings.prompts, limit=settings.num_prompts)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    check_prompts(out, prompts)
    seeds = seeds_for(len(prompts), settings.images_per_prompt, settings.seed)
    generation = {}
    start = time.perf_counter()
    for spec in settings.models:
        generation[spec.name] = generate_model(spec, prompts.prompts, seeds, out / "images" / spec.name, settings)
        g = generation[spec.name]
        print(f"[eval] {spec.name}: generated {g['generated']} images, reused {g['reused']}", flush=True)
    settings.timings["generate"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    scores, reused = score_all(metrics, prompts.prompts, seeds, out, settings)
    settings.timings["score"] = round(time.perf_counter() - start, 1)
    results = write_eval_report(settings, prompts, seeds, metrics, scores, generation, reused)
    results["score_cache_hits"] = reused
    results["cards"] = [str(card) for card in record_in_cards(settings, prompts, results)]
    return results


def record_in_cards(settings: EvalSettings, prompts: PromptSet, results: dict) -> list[Path]:
    """Add the win rates and mean scores of every evaluated run that has a model card (its README.md, written by
    `dkto train`) to that card; the cards updated."""
    from ..train.model_card import add_eval_results

    comps, cards = results["_comparisons"], []
    for spec in settings.models:
        adapter = Path(spec.lora or spec.unet or "")
        mine = [c for c in comps if spec.name in (c.a, c.b)]
        if not (spec.lora or spec.unet) or not mine:
            continue
        means = {m: per for m, per in results["_means"].items() if m in {*(c.a for c in mine), *(c.b for c in mine)}}
        text = (f"`{results['run']['command']}` at `{results['run']['commit']}`: {len(prompts)} prompts of "
                f"{prompts.source}, {settings.images_per_prompt} images per prompt per model, the same seeds for "
                f"every model; this run is `{spec.name}`.\n\n{winrate.winrate_table(mine).to_markdown()}\n\n"
                f"{winrate.means_table(means).to_markdown()}")
        for folder in (adapter, adapter.parent):  # a run folder, or the file / unet/ folder inside it
            card = add_eval_results(folder, f"dkto eval ({prompts.name})", text)
            if card is not None:
                print(f"[eval] added the results to {card}", flush=True)
                cards.append(card)
                break
    return cards
