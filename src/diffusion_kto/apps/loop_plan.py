"""What one round of ``dkto loop`` draws and trains on, from the rounds before it: which prompts (in turn, or the most
uncertain first), how many samples of each, which labels it replays (its own, or every round's so far), and how
many optimizer steps it takes (in proportion to the labels it adds). Pure functions of the loop folder, so that a
resumed loop plans every round exactly as the first run did."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

REPLAY = ("all", "last")  # every round's labels so far / the round's own (the first loops')
PROMPT_CHOICE = ("uncertain", "cycle", "fixed")  # nearest 0.5 liked first / in turn across rounds / from the first
OPTIMIZER = ("keep", "fresh")  # AdamW's state carried from the weights' round / a new optimizer each round
STEPS_PER_IMAGE = 400 / 1024  # the demo config's 400 steps for 1024 images: the same passes over the labels
FEEDBACK = "feedback.jsonl"


def round_folder(out: Path, r: int) -> Path:
    """The folder of round ``r`` (1-based)."""
    return Path(out) / f"round-{r:03d}"


def round_steps(per_round: int, r: int, rate: float = STEPS_PER_IMAGE) -> int:
    """Optimizer steps of round ``r``: in proportion to the labels it adds, rounded so that the rounds' steps add up
    to those of one offline run on all their labels (8 rounds of 32: 12, 13, 12, 13, ... = 100 for 256)."""
    return max(1, round(r * per_round * rate) - round((r - 1) * per_round * rate))


def feedback_rows(out: Path, rounds: Sequence[int]) -> list[dict]:
    """The exported labels of the given rounds, each row's image path relative to the loop folder's round folders."""
    rows = []
    for r in rounds:
        path = round_folder(out, r) / FEEDBACK
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows.append({**row, "image": f"../{path.parent.name}/{row['image']}", "round": r})
    return rows


def write_replay(out: Path, r: int, replay: str) -> Path:
    """The round's training file: its own feedback (``last``), or ``replay.jsonl`` with every round's up to ``r``."""
    folder = round_folder(out, r)
    if replay == "last":
        return folder / FEEDBACK
    path, tmp = folder / "replay.jsonl", folder / "replay.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in feedback_rows(out, range(1, r + 1))))
    tmp.replace(path)
    return path


def liked_counts(rows: Sequence[dict]) -> dict[str, tuple[int, int]]:
    """prompt -> (liked, labelled) over feedback rows."""
    counts: dict[str, tuple[int, int]] = {}
    for row in rows:
        liked, n = counts.get(row["prompt"], (0, 0))
        counts[row["prompt"]] = (liked + bool(row["label"]), n + 1)
    return counts


def uncertainty_order(prompts: Sequence[str], counts: dict[str, tuple[int, int]]) -> list[str]:
    """The prompts, the most uncertain first: the liked share (liked + 1) / (labelled + 2) (a uniform prior, so a
    prompt without labels counts as 0.5) nearest 0.5, then fewer labels, then the world's order."""
    def key(i: int) -> tuple[float, int, int]:
        liked, n = counts.get(prompts[i], (0, 0))
        return abs((liked + 1) / (n + 2) - 0.5), n, i
    return [prompts[i] for i in sorted(range(len(prompts)), key=key)]


def choose_prompts(prompts: Sequence[str], per_round: int, samples: int, r: int, choice: str,
                   earlier: Sequence[dict] = ()) -> list[str]:
    """The round's ``per_round`` prompts, ``samples`` in a row of each: ``fixed`` takes the world's prompts from the
    first each round, ``cycle`` goes on where the last round stopped, ``uncertain`` takes the prompts of the earlier
    rounds' labels nearest 0.5 liked first (round 1: ``cycle``)."""
    distinct = math.ceil(per_round / samples)
    if choice == "uncertain" and r > 1:
        order = uncertainty_order(prompts, liked_counts(earlier))
        picked = [order[i % len(order)] for i in range(distinct)]
    else:
        start = 0 if choice == "fixed" else (r - 1) * distinct
        picked = [prompts[(start + i) % len(prompts)] for i in range(distinct)]
    return [picked[i // samples] for i in range(per_round)]


def check_plan(replay: str, prompt_choice: str, optimizer: str, samples_per_prompt: int, rounds: int,
               per_round: int) -> None:
    """ValueError naming the ``dkto loop`` flag of the first value no loop can use."""
    for flag, value, allowed in (("--replay", replay, REPLAY), ("--prompt-choice", prompt_choice, PROMPT_CHOICE),
                                 ("--optimizer", optimizer, OPTIMIZER)):
        if value not in allowed:
            raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    for flag, value in (("--samples-per-prompt", samples_per_prompt), ("--rounds", rounds), ("--per-round", per_round)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a whole number >= 1, got {value!r}")
    if samples_per_prompt > per_round:
        raise ValueError(f"--samples-per-prompt ({samples_per_prompt}) must not exceed --per-round ({per_round})")
