"""Online vs offline Diffusion-KTO, and DPO, on the shapes world at the same label budget (benchmarks/results/online.md).

    python benchmarks/online.py run OUT [--seeds 0 1 2] [--noise 0 0.15] [--betas 2000 500] [--arms ...] [--groups 4]
    python benchmarks/online.py summary OUT      tables (mean over seeds, 95% CI) and the frontier plot

Every arm is a `dkto loop` folder (apps/loop.py) with the judge `preference` and the demo's threshold 0.85; every arm
gets the same label budget (1024 by default) and the same training steps in total (the loop gives each round steps in
proportion to its images: 400 per 1024):

* ``kto-offline``   one round of 1024 base images (what `dkto demo` does);
* ``kto-online``    four rounds of 256, each drawn from the model the previous round trained;
* ``dpo-offline``   Diffusion-DPO on the pairs formed from the same 1024 labels (loss.name=dpo);
* ``kto-prompt-ref`` the offline arm with loss.reference_point=per_prompt (Q_ref per prompt);
* ``kto-online-new`` the loop's defaults since issue 23 item 3: eight rounds of budget/8, each training on every
  round's labels so far, AdamW's state carried, 4 samples of each prompt, the prompts nearest 0.5 liked first;
* ``kto-online-replay`` / ``-adam`` / ``-8x`` / ``-uncertain``: ``kto-online`` with one of those changes (the last:
  the uncertain prompt choice with its 4 samples per prompt); ``kto-online-new-prompt-ref``: ``kto-online-new`` with
  loss.reference_point=per_prompt;
* ``kto_paired-offline`` / ``kto_paired-online-new``: the offline arm and ``kto-online-new`` with loss.name=kto_paired
  and loss.pair_share=1 (bench align's kto_paired-tuned; give them --betas 60, the beta tuned for it).

``kto-online`` and the offline arms keep the first loops' settings (FIRST: --replay last --optimizer fresh
--prompt-choice fixed --samples-per-prompt 1).

The offline arms share the base images and their labels (copied from ``kto-offline``, which runs first: the loop's
stage markers make the copies skip generating and labelling), and every arm shares the base's held-out evaluation.
The loop's guards are off here (--guard 0 --diversity-guard 0), so that every arm's raw result enters the comparison. Each finished
(arm, seed, noise, beta) is written atomically to OUT/results/<key>.json, so the harness resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

from diffusion_kto.apps.loop import LoopSettings, run_loop
from diffusion_kto.evaluation import winrate
from diffusion_kto.images import line_plot
from diffusion_kto.provenance import commit, machine

BUDGET = 1024


FIRST = {"replay": "last", "optimizer": "fresh", "prompt_choice": "fixed", "samples_per_prompt": 1}
NEW = {"replay": "all", "optimizer": "keep", "prompt_choice": "uncertain", "samples_per_prompt": 4}
PROMPT_REF = ("loss.reference_point=per_prompt",)
# kto_paired as bench align's kto_paired-tuned (every position a same-draw pair; run it with --betas 60, its tuned beta)
PAIRED = ("loss.name=kto_paired", "loss.pair_share=1.0")


def arms(budget: int = BUDGET) -> dict[str, tuple[int, int, tuple[str, ...], dict]]:
    """name -> (rounds, images per round, config overrides, loop settings): the same label budget for every arm."""
    return {"kto-offline": (1, budget, (), FIRST), "kto-online": (4, budget // 4, (), FIRST),
            "dpo-offline": (1, budget, ("loss.name=dpo",), FIRST),
            "kto-prompt-ref": (1, budget, PROMPT_REF, FIRST),
            "kto-online-new": (8, budget // 8, (), NEW),
            "kto-online-replay": (4, budget // 4, (), {**FIRST, "replay": "all"}),
            "kto-online-adam": (4, budget // 4, (), {**FIRST, "optimizer": "keep"}),
            "kto-online-8x": (8, budget // 8, (), FIRST),
            "kto-online-uncertain": (4, budget // 4, (), {**FIRST, "prompt_choice": "uncertain", "samples_per_prompt": 4}),
            "kto-online-new-prompt-ref": (8, budget // 8, PROMPT_REF, NEW),
            "kto_paired-offline": (1, budget, PAIRED, FIRST), "kto_paired-online-new": (8, budget // 8, PAIRED, NEW)}


ARMS = arms()
SHARED = ("base", "round-001/queue", "round-001/prompts.txt", "round-001/feedback.jsonl",
          "round-001/done/generate.json", "round-001/done/label.json")


def settings_of(out: Path, arm: str, seed: int, noise: float, beta: float, groups: int,
                budget: int = BUDGET) -> LoopSettings:
    """The loop settings of one arm at one (seed, label noise, beta)."""
    rounds, per_round, overrides, loop = arms(budget)[arm]
    return LoopSettings(out=out / key(arm, seed, noise, beta), judge="preference", rounds=rounds, per_round=per_round,
                        seed=seed, label_noise=noise, guard=0.0, diversity_guard=0.0, groups_per_prompt=groups,
                        overrides=(f"loss.beta={beta:g}", *overrides), **loop)


def key(arm: str, seed: int, noise: float, beta: float) -> str:
    """The folder and result name of one run."""
    return f"{arm}_s{seed}_n{noise:g}_b{beta:g}"


def share_offline(source: Path, settings: LoopSettings) -> None:
    """Seed an offline arm's folder with the first offline arm's base evaluation, images and labels."""
    target = Path(settings.out)
    if target.exists() or not (source / "round-001" / "done" / "label.json").is_file():
        return
    for part in SHARED:
        src, dst = source / part, target / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    (target / "loop.json").write_text(json.dumps(settings.record(), indent=1))


def share_base(source: Path, settings: LoopSettings) -> None:
    """Seed an arm's folder with the base's held-out evaluation (the same prompts, seeds and judge for every arm)."""
    target = Path(settings.out)
    if target.exists() or not (source / "base" / "done.json").is_file():
        return
    shutil.copytree(source / "base", target / "base")
    (target / "loop.json").write_text(json.dumps(settings.record(), indent=1))


def record(out: Path, arm: str, seed: int, noise: float, beta: float, settings: LoopSettings, rows: list) -> None:
    """OUT/results/<key>.json: the last round's numbers and its held-out scores, written atomically."""
    last = rows[-1]
    folder = Path(settings.out)
    scores = json.loads((folder / f"round-{last['round']:03d}" / "done" / "evaluate.json").read_text())["scores"]
    base = json.loads((folder / "base" / "done.json").read_text())["scores"]
    payload = {"arm": arm, "seed": seed, "noise": noise, "beta": beta, "rounds": rows, "scores": scores,
               "base_scores": base, "commit": commit(), "machine": machine(),
               "seconds": sum(sum(r["seconds"].values()) for r in rows)}
    path = out / "results" / f"{key(arm, seed, noise, beta)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(payload))
    os.replace(path.with_suffix(".tmp"), path)


def run(out: Path, seeds, noises, betas, names, groups: int, budget: int = BUDGET) -> None:
    """Every (seed, noise, beta, arm) not finished yet: offline KTO first (its images and labels are shared), then the
    other offline arms, the online ones last."""
    for seed in seeds:
        for noise in noises:
            for beta in betas:
                first = out / key("kto-offline", seed, noise, beta)
                for arm in sorted(names, key=lambda a: (a != "kto-offline", arms(budget)[a][0] > 1)):
                    if (out / "results" / f"{key(arm, seed, noise, beta)}.json").is_file():
                        continue
                    settings = settings_of(out, arm, seed, noise, beta, groups, budget)
                    if arm != "kto-offline":
                        (share_offline if ARMS[arm][0] == 1 else share_base)(first, settings)
                    print(f"[online] {key(arm, seed, noise, beta)}", flush=True)
                    record(out, arm, seed, noise, beta, settings, run_loop(settings))


def _mean_ci(values) -> str:
    """mean ± 95% CI over seeds (t ~ 1.96 std / sqrt(n); one seed: no interval)."""
    v = np.asarray(values, float)
    return f"{v.mean():.1%}" + (f" ± {1.96 * v.std(ddof=1) / np.sqrt(len(v)):.1%}" if len(v) > 1 else "")


def pooled(pairs) -> str:
    """Win rate of A over B pooled over seeds (the seeds' held-out comparisons together), with its 95% CI."""
    a = np.concatenate([np.asarray(x, float) for x, _ in pairs])
    b = np.concatenate([np.asarray(y, float) for _, y in pairs])
    w = winrate.win_rate(a, b)
    return f"{w.rate:.1%} ± {w.ci:.1%} (n={w.n})"


def arm_table(groups: dict) -> tuple[list[str], dict]:
    """One row per (noise, beta, arm): per-seed and pooled win rate over base, fidelity, diversity, mean score."""
    lines = ["| noise | beta | arm | seeds | win rate over base, pooled | by seed | mean over seeds | fidelity / base "
             "| diversity / base | mean score |", "|---|---|---|---|---|---|---|---|---|---|"]
    frontier: dict[str, list] = {}
    for (noise, beta, arm), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        last = [r["rounds"][-1] for r in rs]
        wr = [x["win_rate"] for x in last]
        fid = [x["fidelity"] / x["fidelity_base"] for x in last]
        div = [x["diversity"] / x["diversity_base"] for x in last]
        by_seed = " / ".join(f"s{r['seed']} {x:.1%}" for r, x in zip(rs, wr))
        lines.append(f"| {noise:g} | {beta:g} | {arm} | {len(rs)} | {pooled([(r['scores'], r['base_scores']) for r in rs])} "
                     f"| {by_seed} | {_mean_ci(wr)} | {_mean_ci(fid)} | {_mean_ci(div)} "
                     f"| {np.mean([x['mean_score'] for x in last]):.3f} |")
        frontier.setdefault(f"{arm} (noise {noise:g})", []).append((float(np.mean(div)), float(np.mean(wr))))
    return lines, frontier


def head_to_head(runs: list[dict]) -> list[str]:
    """Every online arm against the offline arm of its objective, offline KTO and offline DPO, at the same noise and
    beta: pooled over the seeds both have, and by seed."""
    by = {(r["noise"], r["beta"], r["seed"], r["arm"]): r for r in runs}
    lines = ["| noise | beta | online arm | vs | seeds | win rate of the online arm, pooled | by seed |",
             "|---|---|---|---|---|---|---|"]
    names = sorted({(r["noise"], r["beta"], r["arm"]) for r in runs if "-online" in r["arm"]})
    for noise, beta, arm in names:
        own = arm.split("-online")[0] + "-offline"  # the offline arm of the same objective (kto_paired: its own)
        for other in dict.fromkeys((own, "kto-offline", "dpo-offline")):
            seeds = sorted(s for (n, b, s, a) in by if (n, b, a) == (noise, beta, arm) and (noise, beta, s, other) in by)
            if not seeds:
                continue
            pairs = [(by[(noise, beta, s, arm)]["scores"], by[(noise, beta, s, other)]["scores"]) for s in seeds]
            each = " / ".join(f"s{s} {winrate.win_rate(np.asarray(x), np.asarray(y)).rate:.1%}"
                              for s, (x, y) in zip(seeds, pairs))
            lines.append(f"| {noise:g} | {beta:g} | {arm} | {other} | {len(seeds)} | {pooled(pairs)} | {each} |")
    return lines


def summary(out: Path) -> str:
    """Markdown tables over the finished runs, OUT/online-frontier.png and OUT/online.json."""
    runs = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["noise"], r["beta"], r["arm"]), []).append(r)
    lines, frontier = arm_table(groups)
    lines += ["", *head_to_head(runs)]
    (out / "online.json").write_text(json.dumps(runs))  # every finished run: rounds, held-out scores, commit
    plot = line_plot({k: sorted(v) for k, v in frontier.items()}, title="win rate over base vs diversity kept",
                     x_label="diversity / base", y_label="win rate", y_range=(0.0, 1.0), x_range=(0.4, 1.0),
                     size=(720, 380), legend_width=230)
    plot.save(out / "online-frontier.png")
    return "\n".join(lines)


def main() -> None:
    """Command line: run or summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.15])
    r.add_argument("--betas", type=float, nargs="+", default=[2000.0, 500.0])
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    r.add_argument("--groups", type=int, default=4, help="seed groups per held-out prompt (the demo uses 8)")
    r.add_argument("--budget", type=int, default=BUDGET, help="labels per arm")
    s = sub.add_parser("summary")
    s.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.out, args.seeds, args.noise, args.betas, args.arms, args.groups, args.budget)
    print(summary(args.out))


if __name__ == "__main__":
    main()
