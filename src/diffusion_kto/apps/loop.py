"""``dkto loop``: online rounds of Diffusion-KTO. Each round draws images from the current model, gets them labelled
(by a judge, or by people through the labeling app), trains KTO from the current weights on them, and evaluates
the result against the base on held-out prompts, with the reward-hacking guards.

Layout of ``--out`` (every stage of a round is marked done atomically, so a killed loop resumes where it stopped)::

    loop.json                 the settings (a resumed loop must have the same ones; --rounds may grow)
    base/done.json            the base model's held-out scores, fidelity and diversity
    round-001/queue/          the round's images (a dkto generate queue) and labels.sqlite
    round-001/feedback.jsonl  the labels, exported (skips out, raters resolved by majority)
    round-001/model/          the trained run; policy.safetensors: its weights, for the next round
    round-001/done/<stage>.json   generate, label, train, evaluate: what each stage produced
    rounds.jsonl              one row per finished round; report.html / report.md / plot PNG

Training: round r starts from the weights of the last round that passed its guards (the base for round 1), with
that round's AdamW state (``--optimizer keep``; ``fresh``: a new optimizer), and keeps the original base as the
reference (``π_ref``, adapters off or the frozen copy): every round is regularised towards the same model. It trains
on every round's labels so far (``--replay all``, ``round-00r/replay.jsonl``; ``last``: its own), for steps in
proportion to the labels it adds (so the rounds together take the steps of one offline run on all the labels). Its
images are ``--samples-per-prompt`` of each prompt, the prompts whose liked share so far is nearest 0.5 first
(``--prompt-choice uncertain``; ``cycle``: in turn; ``fixed``: the first loops' prompts, from the first each round);
round-planning lives in :mod:`.loop_plan`. A round that fails a guard (fidelity or diversity below ``--guard`` x the base's) is rolled back: its
weights are not used, and the next round starts again from the last good ones, on fresh images."""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..config import load_config
from ..errors import UserError
from ..evaluation import report as report_lib
from ..evaluation import winrate
from ..images import image_grid, line_plot
from ..provenance import commit, machine
from ..sampling import load_pipeline
from ..toy import judges, world
from ..train import DiffusionKTOTrainer
from .demo import CONFIG, DemoSettings, demo_judge, judge_model
from .generate import GenerateSettings, generate_queue
from .label.export import export_labels
from .label.server import make_server, url_of
from .label.store import LabelStore
from .loop_plan import FEEDBACK, check_plan, choose_prompts, feedback_rows, round_steps, write_replay
from .reward_guards import DEFAULT_DIVERSITY_SHARE, DEFAULT_SHARE, guard_verdict

STAGES = ("generate", "label", "train", "evaluate")
WEIGHTS = "policy.safetensors"
OPTIMIZER_STATE = "optimizer.pt"  # AdamW's state after the round, beside its weights (--optimizer keep)
FIRST_LOOPS = {"replay": "last", "optimizer": "fresh", "prompt_choice": "fixed", "samples_per_prompt": 1}  # before


@dataclass
class LoopSettings:
    """Knobs of ``dkto loop``; the defaults are the shapes world's."""

    out: Path = Path("runs/loop")
    model: str = "toy"
    judge: str | None = None  # label with this judge (the specs of dkto demo --judge) ...
    human: bool = False  # ... or with people, through the labeling app
    eval_judge: str | None = None  # scores the held-out images; default: the labeling judge, or "preference" (--human)
    rounds: int = 8
    per_round: int = 128
    replay: str = "all"  # train on every round's labels so far ("last": the round's own)
    optimizer: str = "keep"  # carry AdamW's state from round to round with the weights ("fresh": a new one)
    prompt_choice: str = "uncertain"  # prompts nearest 0.5 liked first ("cycle": in turn, "fixed": the first loops')
    samples_per_prompt: int = 4  # images of each chosen prompt in a round
    seed: int = 0
    threshold: float = 0.85  # --judge: liked = score >= threshold
    label_noise: float = 0.0  # --judge: probability of flipping each label
    guard: float = DEFAULT_SHARE  # a round below this share of the base's fidelity is rolled back ...
    diversity_guard: float = DEFAULT_DIVERSITY_SHARE  # ... or below this share of its diversity
    groups_per_prompt: int = 8
    images_per_prompt: int = 5  # N of the median-of-N win rate
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    poll_seconds: float = 2.0  # --human: how often the loop looks at the labels
    config: Path | None = None  # default: configs/toy-kto.yaml
    overrides: Sequence[str] = ()
    timings: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        """What a resumed loop must share with the first run (not --rounds, nor where the app listens)."""
        skip = {"out", "rounds", "host", "port", "token", "poll_seconds", "timings"}
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self).items() if k not in skip}

    def demo(self) -> DemoSettings:
        """The demo's evaluation settings: held-out prompts x seed groups x N images."""
        return DemoSettings(out=self.out, model=self.model, seed=self.seed, threshold=self.threshold,
                            images_per_prompt=self.images_per_prompt, groups_per_prompt=self.groups_per_prompt)


def _write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def staged(marker: Path, name: str, work: Callable[[], dict], timings: dict | None = None) -> dict:
    """Run ``work`` unless ``marker`` says it finished before; its result is the marker's content."""
    if marker.is_file():
        print(f"[loop] {name}: done earlier, kept", flush=True)
        return json.loads(marker.read_text())
    print(f"[loop] {name} ...", flush=True)
    start = time.perf_counter()
    result = work()
    result["seconds"] = round(time.perf_counter() - start, 1)
    _write_json(marker, result)
    if timings is not None:
        timings[name] = result["seconds"]
    print(f"[loop] {name} done in {result['seconds']:.1f}s", flush=True)
    return result


def _start(settings: LoopSettings) -> None:
    """Create the loop folder, or check that a resumed one was started with the same settings."""
    out, record = Path(settings.out), settings.record()
    if settings.human == bool(settings.judge):
        raise UserError("dkto loop: give either --judge SPEC or --human")
    try:
        check_plan(settings.replay, settings.prompt_choice, settings.optimizer, settings.samples_per_prompt,
                   settings.rounds, settings.per_round)
    except ValueError as err:
        raise UserError(f"dkto loop: {err}") from None
    path = out / "loop.json"
    if path.is_file():
        earlier, defaults = json.loads(path.read_text()), LoopSettings().record()
        changed = sorted(k for k in record if earlier.get(k, FIRST_LOOPS.get(k, defaults[k])) != record[k])  # keys newer than the folder
        if changed:
            raise FileExistsError(f"{out} holds a loop started with other settings ({', '.join(changed)} differ); "
                                  "choose another --out, or repeat the first command to resume it")
        return
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a dkto loop folder; choose another --out")
    _write_json(path, record)


def _pipeline(settings: LoopSettings, weights: Path | None):
    """The base model, or the base with a round's trained LoRA or UNet on top."""
    if weights is None:
        return load_pipeline(settings.model)
    if (weights / "pytorch_lora_weights.safetensors").is_file():
        return load_pipeline(settings.model, lora=str(weights))
    return load_pipeline(settings.model, unet=str(weights))


def _evaluate(settings: LoopSettings, pipe, judge) -> dict:
    """Held-out scores (prompt x group, N), mean score, liked share, fidelity and diversity of one model."""
    result = judge_model(pipe, judge, settings.demo())
    return {"scores": result["scores"].tolist(), "mean_score": float(np.mean(result["scores"])),
            "liked_share": result["liked_share"], "fidelity": result["fidelity"], "diversity": result["diversity"],
            "grid": [np.asarray(im).tolist() for im in result["images"][:: settings.images_per_prompt
                                                                          * settings.groups_per_prompt]]}


def round_prompts(settings: LoopSettings, r: int = 1) -> list[str]:
    """The round's ``per_round`` prompts from the shapes world's training prompts (loop_plan.choose_prompts), planned
    from the labels of the rounds before it."""
    earlier = feedback_rows(settings.out, range(1, r)) if settings.prompt_choice == "uncertain" else []
    return choose_prompts(world.train_prompts(), settings.per_round, settings.samples_per_prompt, r,
                          settings.prompt_choice, earlier)


def _generate(settings: LoopSettings, folder: Path, r: int, weights: Path | None) -> dict:
    """Draw the round's images from the current model into a labeling queue."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.txt").write_text("".join(p + "\n" for p in round_prompts(settings, r)))
    unet_or_lora = {} if weights is None else (
        {"lora": str(weights)} if (weights / "pytorch_lora_weights.safetensors").is_file() else {"unet": str(weights)})
    gen = GenerateSettings(model=settings.model, prompts=str(folder / "prompts.txt"), per_prompt=1,
                           seed=settings.seed * 1_000_000 + r * 10_000, batch_size=64, **unet_or_lora)
    generate_queue(folder / "queue", gen, pipe=_pipeline(settings, weights))
    return {"images": settings.per_round, "model": str(weights) if weights else settings.model}


def _judge_labels(settings: LoopSettings, queue: Path, r: int) -> None:
    """The judge likes or dislikes every image not yet labelled (rater "judge"), one event each."""
    from PIL import Image

    judge = demo_judge(settings.judge)
    store = LabelStore(queue)
    try:
        store.sync_queue()
        done = {item for item, rater in store.current() if rater == "judge"}
        rows = [json.loads(line) for line in (queue / "queue.jsonl").read_text().splitlines()]
        todo = [row for row in rows if row["id"] not in done]
        if not todo:
            return
        images = [Image.open(queue / row["image"]).convert("RGB") for row in todo]
        scores = judge(images, [row["prompt"] for row in todo])
        liked = judges.label(scores, settings.threshold, settings.label_noise, rng=settings.seed * 1000 + r)
        for row, like in zip(todo, liked):
            store.label(row["id"], "judge", "like" if like else "dislike")
    finally:
        store.close()


def wait_for_people(settings: LoopSettings, queue: Path) -> None:
    """Serve the labeling app on the round's queue until every image has a label from someone (a skip counts)."""
    server = make_server(queue, settings.host, settings.port, settings.token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = url_of(server, settings.token)
    print(f"[loop] waiting for people: label the round at {url}{'&' if '?' in url else '?'}rater=YOUR_NAME", flush=True)
    try:
        while True:
            store = LabelStore(queue)
            try:
                stats = store.stats()
            finally:
                store.close()
            if stats["images"] and stats["labelled"] >= stats["images"]:
                return
            time.sleep(settings.poll_seconds)
    finally:
        server.shutdown()
        server.server_close()


def _label(settings: LoopSettings, folder: Path, r: int) -> dict:
    """Labels for the round's images (judge or people), exported as the round's feedback file."""
    queue, feedback = folder / "queue", folder / FEEDBACK
    if settings.human:
        wait_for_people(settings, queue)
    else:
        _judge_labels(settings, queue, r)
    if feedback.exists():  # an export from before a kill: derived data, made again from the labels
        feedback.unlink()
    counts = export_labels(queue, feedback)
    liked, rows = counts.get("liked", 0), counts["rows"]
    return {"labels": rows, "liked": liked, "liked_share": liked / rows, "counts": counts}


def train_overrides(settings: LoopSettings, folder: Path, r: int) -> list[str]:
    """The round's config overrides: its training labels (loop_plan.write_replay), its folder, a seed per round, and
    steps in proportion to the labels it adds (the demo config's 400 per 1024), before the user's own."""
    steps = round_steps(settings.per_round, r)
    data = write_replay(settings.out, r, settings.replay)
    return [f"data.path={data}", f"train.output_dir={folder / 'model'}",
            f"train.seed={settings.seed * 1000 + r}", f"model.pretrained={settings.model}",
            f"train.max_steps={steps}", "train.overwrite=true", *settings.overrides]


def _train(settings: LoopSettings, folder: Path, r: int, weights: Path | None) -> dict:
    """KTO from the current weights (the base's on round 1), the base as reference; saves the policy's weights."""
    from safetensors.torch import load_file, save_file

    cfg = load_config(settings.config or CONFIG, train_overrides(settings, folder, r))
    trainer = DiffusionKTOTrainer(cfg)
    carried = None
    if weights is not None:
        trainer.family.load_trainable_state(load_file(weights / WEIGHTS))
        if settings.optimizer == "keep":
            carried = load_optimizer_state(trainer.optimizer, weights / OPTIMIZER_STATE)
    result = trainer.train()
    save_file(trainer.family.trainable_state(), str(folder / "model" / WEIGHTS))
    save_optimizer_state(trainer.optimizer, folder / "model" / OPTIMIZER_STATE)
    return {"steps": result.steps, "train_seconds": round(result.seconds, 1), "from": str(weights) if weights else None,
            "rows": len(trainer.rows), "optimizer_steps_before": carried,
            "optimizer_steps_after": adam_steps(trainer.optimizer)}


def adam_steps(optimizer) -> int:
    """The step count of AdamW's state (the largest over its parameters; 0 before the first step)."""
    steps = [int(s["step"]) for s in optimizer.state_dict()["state"].values() if "step" in s]
    return max(steps, default=0)


def save_optimizer_state(optimizer, path: Path) -> None:
    """The optimizer's state dict, written atomically beside the round's weights."""
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(optimizer.state_dict(), tmp)
    os.replace(tmp, path)


def load_optimizer_state(optimizer, path: Path) -> int:
    """Restore AdamW's moments and step counts from an earlier round, keeping this round's hyperparameters (lr and
    the rest come from its config); the step count carried."""
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    fresh = optimizer.state_dict()["param_groups"]
    if [g["params"] for g in saved["param_groups"]] != [g["params"] for g in fresh]:
        raise UserError(f"{path}: the optimizer state holds other parameters than this round's model; "
                        "use --optimizer fresh")
    optimizer.load_state_dict({"state": saved["state"], "param_groups": fresh})
    return adam_steps(optimizer)


def _score_round(settings: LoopSettings, folder: Path, base: dict, judge) -> dict:
    """The round's model on the held-out prompts: win rate over the base (median of N), guards."""
    result = _evaluate(settings, _pipeline(settings, folder / "model"), judge)
    wr = winrate.win_rate(np.asarray(result["scores"]), np.asarray(base["scores"]))
    verdict = guard_verdict(base, result, settings.guard, settings.diversity_guard)
    return {**result, "win_rate": wr.rate, "win_rate_ci": wr.ci, "comparisons": wr.n, "guard": verdict}


def run_round(settings: LoopSettings, r: int, weights: Path | None, base: dict, judge) -> tuple[dict, Path | None]:
    """One round's four stages (each kept when done before); (its rounds.jsonl row, the weights for the next round)."""
    folder = Path(settings.out) / f"round-{r:03d}"
    done = folder / "done"
    gen = staged(done / "generate.json", f"round {r}: generate", lambda: _generate(settings, folder, r, weights))
    labels = staged(done / "label.json", f"round {r}: label", lambda: _label(settings, folder, r))
    trained = staged(done / "train.json", f"round {r}: train", lambda: _train(settings, folder, r, weights))
    scored = staged(done / "evaluate.json", f"round {r}: evaluate", lambda: _score_round(settings, folder, base, judge))
    verdict = scored["guard"]
    row = {"round": r, "labels": labels["labels"], "liked_share": round(labels["liked_share"], 4),
           "win_rate": round(scored["win_rate"], 4), "win_rate_ci": round(scored["win_rate_ci"], 4),
           "mean_score": round(scored["mean_score"], 4), "mean_score_base": round(base["mean_score"], 4),
           "fidelity": round(scored["fidelity"], 4), "fidelity_base": round(base["fidelity"], 4),
           "diversity": round(scored["diversity"], 4), "diversity_base": round(base["diversity"], 4),
           "guard_passed": verdict["passed"], "guard": "; ".join(verdict["lines"]),
           "action": "kept" if verdict["passed"] else "rolled back: the next round starts from "
           + (str(weights) if weights else "the base"),
           "trained_from": trained["from"] or "base", "generated_by": gen["model"],
           "trained_on": trained.get("rows"), "optimizer_steps": trained.get("optimizer_steps_after"),
           "seconds": {s: json.loads((done / f"{s}.json").read_text())["seconds"] for s in STAGES}}
    print(f"[loop] round {r}: win rate {row['win_rate']:.1%} over base, mean score {row['mean_score']:.3f}, "
          f"{row['action']}", flush=True)
    for line in verdict["lines"]:
        print(f"[loop]   guard {line}", flush=True)
    return row, (folder / "model" if verdict["passed"] else weights)


def run_loop(settings: LoopSettings) -> list[dict]:
    """Every round not finished yet, then rounds.jsonl and the report; the rows of rounds.jsonl."""
    out = Path(settings.out)
    _start(settings)
    commit()
    judge = demo_judge(settings.eval_judge or settings.judge or "preference")
    base = staged(out / "base" / "done.json", "evaluate the base", lambda: _evaluate(settings, _pipeline(settings, None), judge))
    weights, rows = None, []
    for r in range(1, settings.rounds + 1):
        row, weights = run_round(settings, r, weights, base, judge)
        rows.append(row)
        tmp = out / "rounds.jsonl.tmp"
        tmp.write_text("".join(json.dumps(x) + "\n" for x in rows))
        os.replace(tmp, out / "rounds.jsonl")
    write_loop_report(settings, base, rows)
    return rows


def write_loop_report(settings: LoopSettings, base: dict, rows: list[dict]) -> None:
    """report.html / report.md: the rounds table, the guards, and a plot of win rate and mean score per round."""
    out = Path(settings.out)
    plot = line_plot({"win rate over base": [(r["round"], r["win_rate"]) for r in rows],
                      "mean judge score": [(0, base["mean_score"])] + [(r["round"], r["mean_score"]) for r in rows],
                      "fidelity / base": [(0, 1.0)] + [(r["round"], r["fidelity"] / base["fidelity"]) for r in rows],
                      "diversity / base": [(0, 1.0)] + [(r["round"], r["diversity"] / base["diversity"]) for r in rows]},
                     title="dkto loop: per round", x_label="round", y_range=(0.0, 1.2))
    plot.save(out / "rounds.png")
    table = {f"round {r['round']}": {"labels": r["labels"], "liked share": f"{r['liked_share']:.0%}",
                                      "win rate over base": f"{r['win_rate']:.1%} ± {r['win_rate_ci']:.1%}",
                                      "mean score": f"{r['mean_score']:.3f}", "fidelity": f"{r['fidelity']:.3f}",
                                      "diversity": f"{r['diversity']:.4f}", "guards": r["action"]} for r in rows}
    table = {"base": {"mean score": f"{base['mean_score']:.3f}", "fidelity": f"{base['fidelity']:.3f}",
                      "diversity": f"{base['diversity']:.4f}"}, **table}
    grids = {"win rate and mean score per round": plot}
    images = {"base": base["grid"], **{f"round {r['round']}": json.loads(
        (out / f"round-{r['round']:03d}" / "done" / "evaluate.json").read_text())["grid"] for r in rows}}
    from PIL import Image

    grids["held-out prompts, base and each round"] = image_grid(
        {k: [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in v] for k, v in images.items()},
        col_labels=world.eval_prompts())
    command = ["dkto", *sys.argv[1:]] if sys.argv[1:2] == ["loop"] else ["python", *sys.argv]  # a harness's own
    run = {"command": " ".join(command), "commit": commit(), "machine": machine()}
    rolled = [r["round"] for r in rows if not r["guard_passed"]]
    report_lib.write_report(
        out, title="dkto loop: online rounds of Diffusion-KTO", run_info=run, extra_tables={"Rounds": table},
        grids=grids, results={"run": run, "settings": settings.record(), "rounds": rows}, results_name="loop.results.json",
        notes=[f"Guards: a round whose fidelity falls below {settings.guard:.0%} of the base's, or its diversity below "
               f"{settings.diversity_guard:.0%}, is rolled back (its weights are not used by the next round). " +
               (f"Rolled back: rounds {', '.join(map(str, rolled))}." if rolled else "Every round passed."),
               "Reference model: the original base in every round; each round starts from the last kept round's "
               "weights."])
