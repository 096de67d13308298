"""Round planning of `dkto loop` (apps/loop_plan.py) with hand values, and a tiny loop that replays every round's
labels and carries AdamW's state: the rows it trained on, the optimizer's step count, the flags and their errors."""
import json

import pytest
import torch

from test_cli import dkto

from diffusion_kto.apps.loop import adam_steps, load_optimizer_state, save_optimizer_state
from diffusion_kto.apps.loop_plan import (check_plan, choose_prompts, feedback_rows, round_steps, uncertainty_order,
                                          write_replay)


def _feedback(out, r, rows):
    folder = out / f"round-{r:03d}"
    folder.mkdir(parents=True)
    (folder / "feedback.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_round_steps_add_up_to_the_offline_runs_steps():
    assert [round_steps(64, r) for r in range(1, 5)] == [25, 25, 25, 25]  # the first loops' 4 x 64
    eight = [round_steps(32, r) for r in range(1, 9)]
    assert sum(eight) == round(256 * 400 / 1024) == 100 and set(eight) == {12, 13}
    assert round_steps(1, 1) == 1  # never a round without a step


def test_replay_all_holds_every_earlier_rounds_rows_with_paths_that_resolve(tmp_path):
    _feedback(tmp_path, 1, [{"image": "queue/images/000000.png", "prompt": "a", "label": True}])
    _feedback(tmp_path, 2, [{"image": "queue/images/000000.png", "prompt": "b", "label": False},
                            {"image": "queue/images/000001.png", "prompt": "b", "label": True}])
    assert write_replay(tmp_path, 2, "last") == tmp_path / "round-002" / "feedback.jsonl"
    path = write_replay(tmp_path, 2, "all")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["round"], r["prompt"]) for r in rows] == [(1, "a"), (2, "b"), (2, "b")]
    assert (path.parent / rows[0]["image"]).resolve() == (tmp_path / "round-001/queue/images/000000.png").resolve()


def test_uncertainty_order_puts_the_prompts_nearest_half_liked_first():
    prompts = ["always", "never", "half", "mostly", "unseen"]
    counts = {"always": (4, 4), "never": (0, 4), "half": (2, 4), "mostly": (3, 4)}
    # smoothed shares (l + 1) / (n + 2): 5/6, 1/6, 1/2, 2/3, and 1/2 for the unseen prompt (fewer labels: first)
    assert uncertainty_order(prompts, counts) == ["unseen", "half", "mostly", "always", "never"]


def test_choose_prompts_fixed_cycle_and_uncertain():
    prompts = [f"p{i}" for i in range(5)]
    assert choose_prompts(prompts, 6, 1, 3, "fixed") == ["p0", "p1", "p2", "p3", "p4", "p0"]  # the first loops'
    assert choose_prompts(prompts, 4, 2, 1, "cycle") == ["p0", "p0", "p1", "p1"]
    assert choose_prompts(prompts, 4, 2, 2, "cycle") == ["p2", "p2", "p3", "p3"]  # goes on where round 1 stopped
    assert choose_prompts(prompts, 4, 2, 1, "uncertain") == ["p0", "p0", "p1", "p1"]  # round 1: in turn
    earlier = [{"prompt": "p0", "label": True}, {"prompt": "p0", "label": True},
               {"prompt": "p1", "label": True}, {"prompt": "p1", "label": False}]
    assert choose_prompts(prompts, 5, 2, 2, "uncertain", earlier) == ["p2", "p2", "p3", "p3", "p4"]
    seen = earlier + [{"prompt": p, "label": False} for p in ("p2", "p3", "p4") for _ in range(3)]
    assert choose_prompts(prompts, 4, 2, 3, "uncertain", seen) == ["p1", "p1", "p0", "p0"]  # 1/2, then 3/4 vs 1/5


def test_check_plan_names_the_flag():
    check_plan("all", "uncertain", "keep", 4, 8, 32)
    for args, flag in ((("some", "uncertain", "keep", 4, 8, 32), "--replay"),
                       (("all", "random", "keep", 4, 8, 32), "--prompt-choice"),
                       (("all", "uncertain", "reset", 4, 8, 32), "--optimizer"),
                       (("all", "uncertain", "keep", 0, 8, 32), "--samples-per-prompt"),
                       (("all", "uncertain", "keep", 64, 8, 32), "--samples-per-prompt")):
        with pytest.raises(ValueError, match=flag):
            check_plan(*args)


def test_optimizer_state_round_trip_keeps_the_step_count_and_this_rounds_lr(tmp_path):
    w = torch.nn.Parameter(torch.ones(3))
    first = torch.optim.AdamW([w], lr=1e-3)
    for _ in range(3):
        w.grad = torch.ones(3)
        first.step()
    save_optimizer_state(first, tmp_path / "optimizer.pt")
    second = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=5e-4)
    assert load_optimizer_state(second, tmp_path / "optimizer.pt") == 3 == adam_steps(second)
    assert second.param_groups[0]["lr"] == 5e-4
    other = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(Exception, match="--optimizer fresh"):
        load_optimizer_state(other, tmp_path / "optimizer.pt")


def test_tiny_loop_replays_earlier_rounds_and_carries_the_optimizer(tmp_path):
    out = tmp_path / "loop"
    proc = dkto("loop", "--judge", "preference", "--out", str(out), "--rounds", "2", "--per-round", "6",
                "--samples-per-prompt", "3", "--groups", "1", "--images-per-prompt", "2", "--guard", "0",
                "--diversity-guard", "0", "train.batch_size=2", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["trained_on"] for r in rows] == [6, 12]  # round 2 trained on round 1's labels too
    replay = [json.loads(line) for line in (out / "round-002" / "replay.jsonl").read_text().splitlines()]
    assert replay[:6] == feedback_rows(out, [1]) and {r["round"] for r in replay} == {1, 2}
    assert [r["optimizer_steps"] for r in rows] == [2, 4]  # AdamW's step count went on from round 1's
    train = json.loads((out / "round-002" / "done" / "train.json").read_text())
    assert train["optimizer_steps_before"] == 2
    prompts = (out / "round-001" / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 6 and len(set(prompts)) == 2  # 3 samples of each prompt
    settings = json.loads((out / "loop.json").read_text())
    assert (settings["replay"], settings["optimizer"], settings["prompt_choice"]) == ("all", "keep", "uncertain")


def test_bad_loop_flags_give_one_line_naming_the_flag(tmp_path):
    for flag, value in (("--replay", "sometimes"), ("--optimizer", "reset"), ("--prompt-choice", "random"),
                        ("--samples-per-prompt", "0")):
        proc = dkto("loop", "--judge", "preference", "--out", str(tmp_path / "loop"), flag, value)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0], proc.stderr
        assert not (tmp_path / "loop").exists()


def test_a_loop_folder_from_before_the_flags_resumes_only_with_the_first_loops_settings(tmp_path):
    from diffusion_kto.apps.loop import FIRST_LOOPS, LoopSettings

    out = tmp_path / "loop"
    out.mkdir()
    old = {k: v for k, v in LoopSettings(judge="preference", per_round=8).record().items() if k not in FIRST_LOOPS}
    (out / "loop.json").write_text(json.dumps(old))
    proc = dkto("loop", "--judge", "preference", "--per-round", "8", "--rounds", "0", "--out", str(out))
    assert proc.returncode == 2 and "--rounds must be" in proc.stderr  # checked before the folder
    proc = dkto("loop", "--judge", "preference", "--per-round", "8", "--out", str(out))
    assert proc.returncode == 2
    assert "optimizer, prompt_choice, replay, samples_per_prompt differ" in proc.stderr
