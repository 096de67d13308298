"""`dkto demo`: the whole align-from-likes loop on the shapes world, on a CPU, in minutes.

Shipped base model (``toy``, or the flow-matching ``toy-flow``) -> images for the training prompts -> a judge's likes
and dislikes -> a feedback dataset (images + JSONL) -> Diffusion-KTO with the model's config (``configs/toy-kto.yaml``,
``configs/toy-flow-kto.yaml``) -> base vs aligned on held-out prompts and
seeds with the paper's protocol (N images per prompt, median-scored image compared, binomial 95% CI, §5)
-> ``report.md``, ``report.html``, ``metrics.json`` and an image grid."""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..config import load_config
from ..evaluation import report as report_lib
from ..evaluation import winrate
from ..evaluation.judges import Judge, load_judge
from ..images import image_grid
from ..provenance import commit, machine
from ..sampling import generate, load_pipeline
from ..train import DiffusionKTOTrainer
from ..train.model_card import add_eval_results
from .guard_rollback import GuardPlan, checkpoint_overrides, rollback
from .reward_guards import DEFAULT_DIVERSITY_SHARE, DEFAULT_SHARE, diversity, guard_verdict
from ..toy import judges, world

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG = CONFIGS / "toy-kto.yaml"
SAMPLING = {"steps": 20, "guidance": 3.0, "resolution": world.SIZE}
# the flow toy without classifier-free guidance: at guidance 3 it draws almost only clean shapes, at 1 (its learned
# distribution) the corpus's flaws come through as in the SD toy at 3 (toy/weights-flow/README.md)
FLOW_SAMPLING = {"steps": 20, "guidance": 1.0, "resolution": world.SIZE}
# each shipped model's demo: its training config and sampling (a folder of another format: pass --config)
MODELS = {"toy": (CONFIG, SAMPLING), "toy-flow": (CONFIGS / "toy-flow-kto.yaml", FLOW_SAMPLING)}


@dataclass
class DemoSettings:
    """Knobs of one demo run; the defaults are the README's demo."""

    out: Path = Path("runs/demo")
    model: str = "toy"  # the base pipeline: the shipped shapes-world model, or a folder in its format
    judge: str = judges.DEFAULT_JUDGE
    budget: int = 1024  # feedback images generated and judged
    seed: int = 0
    # liked = score >= threshold. A strict person: 0.85 likes only faithful, clean, centred images (about 30% of the
    # base's feedback images, 23% of its held-out ones). At 0.5 the liked class kept many grainy images and the
    # aligned model won only 60% of comparisons (README, commit 0dc068a).
    threshold: float = 0.85
    label_noise: float = 0.0  # probability of flipping a label (inconsistent people)
    images_per_prompt: int = 5  # N of the paper's median-of-N protocol
    groups_per_prompt: int = 8  # independent seed groups per held-out prompt: comparisons = prompts x groups
    config: Path | None = None  # None: the model's own (MODELS), toy-kto.yaml for a folder
    overrides: Sequence[str] = ()
    guard: float = DEFAULT_SHARE  # the aligned model must keep this share of the base's prompt fidelity ...
    diversity_guard: float = DEFAULT_DIVERSITY_SHARE  # ... and this share of its diversity (apps/reward_guards.py)
    guard_checks: int = GuardPlan.checks  # checkpoints written for the guards; 0: no rollback
    guard_search: str = GuardPlan.search  # "chord" (the largest passing alpha) or "checkpoints" (the newest passing)
    timings: dict[str, float] = field(default_factory=dict)
    sampling: dict | None = None  # None: the model's own (MODELS)

    def __post_init__(self):
        config, sampling = MODELS.get(self.model, MODELS["toy"])
        self.config = Path(self.config) if self.config is not None else config
        self.sampling = dict(self.sampling if self.sampling is not None else sampling)
        GuardPlan(search=self.guard_search)  # a bad guard search stops here, before anything runs


SCORE_BOUNDS = (0.0, 1.0)  # a demo judge scores each image in [0, 1]; liked = score >= --threshold


def demo_judge(spec: str | Judge) -> Judge:
    """The judge of ``--judge``, checked on every call (one finite score in [0, 1] per image): a bare name of a shapes-world judge (``preference``, the default; ``fidelity``, ...)
    is the registered ``toy:<name>``; anything else is a spec for :func:`~diffusion_kto.evaluation.judges.load_judge`
    (``provider:name``, ``package.module:callable``, ``path/to/file.py:callable``)."""
    if isinstance(spec, str) and spec.strip() in judges.JUDGES:
        spec = f"toy:{spec.strip()}"
    return load_judge(spec, bounds=SCORE_BOUNDS)


@contextmanager
def stage(settings: DemoSettings, name: str) -> Iterator[None]:
    """Print and record the wall time of one stage."""
    print(f"[demo] {name} ...", flush=True)
    start = time.perf_counter()
    yield
    settings.timings[name] = round(time.perf_counter() - start, 1)
    print(f"[demo] {name} done in {settings.timings[name]:.1f}s", flush=True)


def collect_feedback(pipe, judge, settings: DemoSettings, folder: Path) -> dict[str, float]:
    """Generate ``budget`` images over the training prompts, judge them and write images + feedback.jsonl."""
    prompts = world.train_prompts()
    chosen = [prompts[i % len(prompts)] for i in range(settings.budget)]
    seeds = [settings.seed * 1_000_000 + i for i in range(settings.budget)]
    images = generate(pipe, chosen, seeds, batch_size=64, progress=True, **settings.sampling)
    scores = np.asarray(judge(images, chosen), dtype=float)
    liked = judges.label(scores, settings.threshold, settings.label_noise, rng=settings.seed)
    (folder / "images").mkdir(parents=True)
    with open(folder / "feedback.jsonl", "w") as fh:
        for i, (image, prompt, score, like) in enumerate(zip(images, chosen, scores, liked)):
            image.save(folder / "images" / f"{i:05d}.png")
            row = {"image": f"images/{i:05d}.png", "prompt": prompt, "label": bool(like), "score": round(float(score), 4)}
            fh.write(json.dumps(row) + "\n")
    return {"images": len(images), "liked": int(liked.sum()), "liked_share": float(liked.mean()),
            "mean_score": float(scores.mean())}


def eval_images(pipe, settings: DemoSettings, condition: Callable[[str], str] | None = None
                ) -> tuple[list, list[str], np.ndarray]:
    """Images for every (held-out prompt, seed group, image) with seeds disjoint from the feedback seeds.

    ``condition`` rewrites the prompt the model sees (e.g. CSFT's "good image, " prefix); the returned prompts
    are the plain ones, for judging."""
    n, groups = settings.images_per_prompt, settings.groups_per_prompt
    prompts, seeds = [], []
    for p_idx, prompt in enumerate(world.eval_prompts()):
        for g in range(groups):
            for k in range(n):
                prompts.append(prompt)
                seeds.append(10_000_000 + settings.seed * 100_000 + (p_idx * groups + g) * n + k)
    shown = [condition(p) for p in prompts] if condition else prompts
    images = generate(pipe, shown, seeds, batch_size=64, progress=True, **settings.sampling)
    return images, prompts, np.asarray(seeds)


def run_demo(settings: DemoSettings) -> dict:
    """The whole loop; returns the metrics written to ``metrics.json``."""
    out = Path(settings.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"demo output folder {out} exists and is not empty; choose another --out")
    judge = demo_judge(settings.judge)  # a bad spec stops here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    commit()  # the code this run starts with is what its report names
    total = time.perf_counter()
    with stage(settings, "load base model"):
        base = load_pipeline(settings.model, device="cpu")
    with stage(settings, "collect feedback"):
        feedback = collect_feedback(base, judge, settings, out / "feedback")
    print(f"[demo] feedback: {feedback['liked']} liked of {feedback['images']} ({feedback['liked_share']:.0%})")
    with stage(settings, "train (Diffusion-KTO)"):
        trainer = DiffusionKTOTrainer(training_config(settings, out))
        initial = {k: v.clone() for k, v in trainer.family.trainable_state().items()}  # step 0, for a rollback
        trained = trainer.train()
    guarded = None
    if settings.guard_checks > 0:
        with stage(settings, "guard"):
            plan = GuardPlan(checks=settings.guard_checks, share=settings.guard,
                             diversity_share=settings.diversity_guard, search=settings.guard_search)
            guarded = rollback(trainer, base, initial, plan, settings.seed, settings.sampling, trained.steps)
        print(f"[demo] {guarded['line']}", flush=True)
    with stage(settings, "evaluate"):
        aligned = trained_pipeline(settings.model, trained, device="cpu")
        results = evaluate(base, aligned, judge, settings)
    with stage(settings, "report"):
        metrics = write_demo_report(out, settings, feedback, trained, results, time.perf_counter() - total, guarded)
    wr = metrics["win_rate"]
    print(f"[demo] aligned beats base in {wr['rate']:.1%} ± {wr['ci']:.1%} of {wr['n']} comparisons "
          f"(median of {settings.images_per_prompt}); report: {out / 'report.html'}")
    for line in metrics["guard"]["lines"]:
        print(f"[demo] guard {line}")
    if not metrics["guard"]["passed"]:
        print(f"[demo] GUARD FAILED ({', '.join(metrics['guard']['failed'])}): the judge's win rate came at the cost of "
              "what it does not score (reward hacking?); do not use this aligned model", flush=True)
    return metrics


def training_config(settings: DemoSettings, out: Path):
    """The demo's training config: the model's, on the collected feedback, checkpointed for the guards' rollback."""
    overrides = [f"data.path={out / 'feedback' / 'feedback.jsonl'}", f"train.output_dir={out / 'model'}",
                 f"train.seed={settings.seed}", f"model.pretrained={settings.model}"]
    steps = load_config(settings.config, [*overrides, *settings.overrides]).train.max_steps
    return load_config(settings.config, [*overrides, *checkpoint_overrides(steps, settings.guard_checks),
                                         *settings.overrides])


def trained_pipeline(model: str, trained, device: str | None = None):
    """The base pipeline with a finished run's export on top: its LoRA adapters, or its full UNet / transformer."""
    exported = Path(trained.exported[0])
    if exported.suffix == ".safetensors":  # pytorch_lora_weights.safetensors in the run's folder
        return load_pipeline(model, device=device, lora=str(exported.parent))
    return load_pipeline(model, device=device, unet=str(exported))


def judge_model(pipe, judge, settings: DemoSettings) -> dict:
    """One model on the held-out prompts and seeds: images, judge scores (prompt x group, image), fidelity, liked
    share and diversity."""
    images, prompts, seeds = eval_images(pipe, settings)
    scores = np.asarray(judge(images, prompts), dtype=float)
    return {
        "images": images, "prompts": prompts, "seeds": seeds,
        "scores": scores.reshape(-1, settings.images_per_prompt),
        "fidelity": float(np.mean(judges.fidelity(images, prompts))),
        "liked_share": float(np.mean(scores >= settings.threshold)),
        "diversity": diversity(images, settings.images_per_prompt),
    }


def evaluate(base, aligned, judge, settings: DemoSettings) -> dict:
    """Scores, fidelity and diversity of base and aligned on the same held-out prompts and seeds."""
    return {name: judge_model(pipe, judge, settings) for name, pipe in (("base", base), ("aligned", aligned))}


def write_demo_report(out: Path, settings: DemoSettings, feedback: dict, trained, results: dict, seconds: float,
                      guarded: dict | None = None) -> dict:
    """metrics.json, report.md, report.html and the base-vs-aligned grid; ``guarded``: the guards' rollback."""
    n = settings.images_per_prompt
    wr = winrate.win_rate(results["aligned"]["scores"], results["base"]["scores"])
    comparison = winrate.Comparison("aligned", "base", settings.judge, wr)
    means = winrate.mean_scores({m: {settings.judge: r["scores"]} for m, r in results.items()})
    guards = {m: {"judge liked share": f"{r['liked_share']:.1%}", "prompt fidelity": f"{r['fidelity']:.3f}",
                  "diversity": f"{r['diversity']:.4f}"} for m, r in results.items()}
    cols = list(range(0, len(results["base"]["images"]), n * settings.groups_per_prompt))[:12]
    grid = image_grid({m: [results[m]["images"][i] for i in cols] for m in ("base", "aligned")},
                                 col_labels=[f"{results['base']['prompts'][i]} #{results['base']['seeds'][i]}" for i in cols])
    verdict = guard_verdict(results["base"], results["aligned"], settings.guard, settings.diversity_guard)
    metrics = {
        "win_rate": {"rate": wr.rate, "ci": wr.ci, "n": wr.n, "wins": wr.wins, "ties": wr.ties},
        "guard": verdict,
        "guard_rollback": guarded,  # None: --guard-checks 0
        "base": {k: results["base"][k] for k in ("fidelity", "liked_share", "diversity")},
        "aligned": {k: results["aligned"][k] for k in ("fidelity", "liked_share", "diversity")},
        "mean_score": {m: {"mean": ms[settings.judge].mean, "ci": ms[settings.judge].ci} for m, ms in means.items()},
        "feedback": feedback,
        "train": {"steps": trained.steps, "seconds": round(trained.seconds, 1),
                  "images_per_second": round(trained.images_per_second, 2)},
        "stage_seconds": settings.timings,
        "total_seconds": round(seconds, 1),
        "settings": {"judge": settings.judge, "budget": settings.budget, "seed": settings.seed,
                     "threshold": settings.threshold, "label_noise": settings.label_noise,
                     "images_per_prompt": n, "groups_per_prompt": settings.groups_per_prompt,
                     "held_out_prompts": len(world.eval_prompts()), "sampling": settings.sampling,
                     "config": str(settings.config), "overrides": list(settings.overrides),
                     "guards": [settings.guard, settings.diversity_guard], "guard_checks": settings.guard_checks,
                     "guard_search": settings.guard_search},
        "run": {"command": " ".join(["dkto", *sys.argv[1:]]) if sys.argv else "dkto demo",
                "commit": commit(), "machine": machine()},
    }
    record_in_card(trained.output_dir, metrics, means, grid, settings)
    report_lib.write_report(
        out, title="diffusion-kto demo: aligning the shapes world to a judge's likes",
        run_info={**metrics["run"], "wall time (s)": metrics["stage_seconds"], "total (s)": metrics["total_seconds"]},
        winrates=[comparison], means=means, extra_tables={"Guards against reward hacking": guards},
        grids={"base vs aligned (same prompts and seeds)": grid},
        scores={m: {settings.judge: r["scores"]} for m, r in results.items()},
        results=metrics, results_name="metrics.json",
        notes=[f"{wr.n} comparisons = {len(world.eval_prompts())} held-out prompts x {settings.groups_per_prompt} "
               f"seed groups; in each, the median-scored of {n} images per model is compared; ties count half.",
               ("Guards passed: " if verdict["passed"] else "GUARD FAILED, do not use the aligned model: ")
               + "; ".join(verdict["lines"]),
               f"Training: {guarded['line']}." if guarded else "Training: no guard rollback (--guard-checks 0)."],
    )
    return metrics


def record_in_card(run: Path, metrics: dict, means: dict, grid, settings: DemoSettings) -> Path | None:
    """Add the demo's evaluation (win rate over the base, mean judge scores, guards, the base-vs-aligned grid) to the
    trained model's card."""
    wr = metrics["win_rate"]
    grid.save(Path(run) / "demo-grid.png")
    text = (f"`{metrics['run']['command']}` at `{metrics['run']['commit']}` ({metrics['run']['machine']}), judge "
            f"`{settings.judge}`, {len(world.eval_prompts())} held-out prompts x {settings.groups_per_prompt} seed "
            f"groups, median of {settings.images_per_prompt} images per comparison.\n\n"
            f"- win rate over the base: **{wr['rate']:.1%} ± {wr['ci']:.1%}** ({wr['n']} comparisons, ties half)\n"
            f"- prompt fidelity: {metrics['base']['fidelity']:.3f} (base) -> {metrics['aligned']['fidelity']:.3f}\n"
            f"- diversity: {metrics['base']['diversity']:.4f} (base) -> {metrics['aligned']['diversity']:.4f}\n"
            f"- training: {(metrics['guard_rollback'] or {}).get('line', 'no guard rollback (--guard-checks 0)')}\n\n"
            f"{winrate.means_table(means).to_markdown()}\n\n![base vs aligned](demo-grid.png)\n\n"
            "Base (top) and aligned (bottom), the same held-out prompts and seeds.")
    return add_eval_results(run, "dkto demo", text)
