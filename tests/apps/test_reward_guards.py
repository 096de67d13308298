"""A judge that scores one trait and ignores the prompt rewards a model that stops following prompts: the guard on
prompt fidelity catches what that judge's win rate hides (benchmarks/one_trait_judges.py)."""
import importlib.util
from pathlib import Path

import numpy as np

from diffusion_kto.apps.demo import demo_judge, diversity
from diffusion_kto.apps.reward_guards import guard_verdict
from diffusion_kto.evaluation import winrate
from diffusion_kto.toy import judges, world

PROBES = Path(__file__).resolve().parents[2] / "benchmarks" / "one_trait_judges.py"


def _probes():
    spec = importlib.util.spec_from_file_location("one_trait_judges", PROBES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_red_drawing_model_wins_under_the_reddest_judge_and_fails_the_fidelity_guard():
    prompts = [p for p in world.eval_prompts() for _ in range(5)]
    faithful = [world.render(p, rng=i) for i, p in enumerate(prompts)]  # the prompted colours
    hacked = [world.render(world.Spec("red", world.parse(p).shape, world.parse(p).background), rng=i)
              for i, p in enumerate(prompts)]  # red, whatever the prompt says
    judge = demo_judge(f"{PROBES}:reddest")  # the user-judge path of dkto demo / dkto loop, checked in [0, 1]
    wr = winrate.win_rate(judge(hacked, prompts).reshape(-1, 5), judge(faithful, prompts).reshape(-1, 5))
    assert wr.rate > 0.8  # the one-trait judge prefers the model that ignores the prompt
    stats = {name: {"fidelity": float(np.mean(judges.fidelity(ims, prompts))), "diversity": diversity(ims, 5)}
             for name, ims in (("base", faithful), ("hacked", hacked))}
    verdict = guard_verdict(stats["base"], stats["hacked"])
    assert not verdict["passed"] and "fidelity" in verdict["failed"]


def test_probes_score_in_the_unit_interval():
    probes = _probes()
    images = [world.render("a red circle", rng=0), world.render("a blue square on black", rng=1)]
    for fn in (probes.reddest, probes.greenest, probes.brightest, probes.most_saturated):
        scores = fn(images, None)
        assert scores.shape == (2,) and np.all((0 <= scores) & (scores <= 1))
    assert probes.reddest(images)[0] > 0.9 and probes.reddest(images)[1] == 0.0
    green = [world.render("a green triangle", rng=2)]
    assert probes.greenest(green)[0] > 0.9 and probes.greenest(images).max() == 0.0
