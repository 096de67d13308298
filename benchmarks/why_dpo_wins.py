"""Why does Diffusion-DPO beat Diffusion-KTO on the shapes world? Controlled measurements behind
benchmarks/results/why-dpo-wins.md (issue 23, item 1).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/why_dpo_wins.py [--parts counts,grads,saturation,sweep]
        [--out runs/why-dpo-wins] [--json benchmarks/results/why-dpo-wins.json]

Everything runs on the feedback `dkto bench align --quick` builds (512 judged images of the base toy model, seed 0,
liked = preference >= 0.85) and its seed-0 configs (configs/toy-kto.yaml + bench_align.COMMON + METHODS, lr 4e-5,
80 steps), through the library's own trainer, forward pass and objectives:

- counts: how many pairs DPO forms from the labels, which labels they use, and how many loss terms each method
  draws per label over the 80 steps (the real samplers);
- grads: per-sample gradients w.r.t. every trainable weight of KTO's liked and disliked terms and DPO's per-pair
  term, on DPO's first real batch (32 pairs) and KTO's first real batch, at the base model and after 40 and 80
  steps of the real KTO training;
- saturation: every sample's KTO margin z over the real 80-step KTO run (sigma'(z) < 0.05), how often the matched
  Q_ref clamp at 0 binds, and DPO's margins over its real 80-step run;
- sweep: beta, lr and batch size of KTO and DPO on tuning seed 1, scored on training prompts with fresh image seeds.
Each part writes its numbers into the JSON (merged with the parts already there)."""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from diffusion_kto import forward, losses
from diffusion_kto.apps.bench_align import COMMON, METHODS, QUICK_STEPS
from diffusion_kto.apps.demo import CONFIG, SAMPLING, DemoSettings, collect_feedback
from diffusion_kto.config import load_config
from diffusion_kto.data import DesirableSampler, read_feedback
from diffusion_kto.data.pairs import feedback_to_pairs
from diffusion_kto.objectives import DPO, KTO, prompt_groups
from diffusion_kto.provenance import commit, machine
from diffusion_kto.sampling import generate, load_pipeline
from diffusion_kto.toy import judges, world
from diffusion_kto.train import DiffusionKTOTrainer

LR = 4e-5  # the quick bench's only learning rate
SEED = 0  # the bench's training seed 0 (counts, grads, saturation)
TUNING_SEED = 1  # the sweep's training seed
MID = 40  # the mid-training checkpoint (optimizer steps)
# a term is saturated when its sigmoid weight is below this: |z| > 2.89 (KTO's sigma'(z)), m > 2.94 (DPO's sigma(-m))
FLAT = 0.05
INDEPENDENT = 10_000_000  # added to the rejected images' draw ids: their own noise and t instead of the pair's
VAL_IMAGES = 4  # validation images per training prompt in the sweep (seeds 60_000_000 + i)


def run_config(out: Path, feedback: Path, method: str, name: str, *extra: str, seed: int = SEED, lr: float = LR,
               steps: int = QUICK_STEPS):
    """The align bench's config of ``method`` (its _train overrides), with ``extra`` overrides last."""
    return load_config(CONFIG, [f"data.path={feedback}", f"train.output_dir={out / 'models' / name}",
                                f"train.seed={seed}", f"optim.lr={lr}", f"train.max_steps={steps}",
                                "train.overwrite=true", *COMMON, *METHODS[method], *extra])


def build_feedback(out: Path) -> Path:
    """The quick align bench's feedback (512 images, 4 seed groups, seed 0), built once into ``out``/feedback."""
    folder = out / "feedback"
    if not (folder / "feedback.jsonl").is_file():
        demo = DemoSettings(out=out, budget=512, groups_per_prompt=4)
        stats = collect_feedback(load_pipeline("toy", device="cpu"), judges.preference, demo, folder)
        (folder / "stats.json").write_text(json.dumps(stats))
    return folder / "feedback.jsonl"


# ------------------------------------------------------------------------------------------------ 1. counts


def draws(desirable: list[bool], ratio: float, cfg) -> list[int]:
    """The row (or pair) indices the real sampler draws over the run's steps."""
    sampler = DesirableSampler(desirable, ratio, seed=cfg.train.seed, batch_size=cfg.train.batch_size)
    return [int(row) for row, _ in itertools.islice(iter(sampler), cfg.train.max_steps * cfg.train.batch_size)]


def count_terms(rows, kto_cfg, dpo_cfg) -> dict:
    """Pairs DPO forms from the labels, labels they use, and loss terms per label of each method over the run."""
    liked = [r.desirable for r in rows]
    per_prompt = {}
    for r in rows:
        per_prompt.setdefault(r.prompt, [0, 0])[0 if r.desirable else 1] += 1
    pairs = feedback_to_pairs(rows, dpo_cfg.data.max_pairs_per_prompt, seed=dpo_cfg.train.seed)
    uncapped = feedback_to_pairs(rows, None, seed=dpo_cfg.train.seed)
    index = {id(r): i for i, r in enumerate(rows)}
    chosen = {index[id(p.chosen)] for p in pairs}
    rejected = {index[id(p.rejected)] for p in pairs}
    kto_draws = draws(liked, kto_cfg.data.desirable_ratio, kto_cfg)
    pair_draws = draws([True] * len(pairs), 1.0, dpo_cfg)
    image_terms = np.zeros(len(rows))
    for k in pair_draws:
        image_terms[index[id(pairs[k].chosen)]] += 1
        image_terms[index[id(pairs[k].rejected)]] += 1
    kto_terms = np.bincount(kto_draws, minlength=len(rows))
    n_liked, lk = int(sum(liked)), np.asarray(liked)
    return {
        "labels": len(rows), "liked": n_liked, "disliked": len(rows) - n_liked, "prompts": len(per_prompt),
        "prompts_with_both": sum(1 for a, b in per_prompt.values() if a and b),
        "max_pairs_per_prompt": dpo_cfg.data.max_pairs_per_prompt, "pairs": len(pairs), "pairs_uncapped": len(uncapped),
        "liked_in_pairs": len(chosen), "disliked_in_pairs": len(rejected),
        "labels_in_pairs_share": (len(chosen) + len(rejected)) / len(rows),
        "steps": kto_cfg.train.max_steps, "batch": kto_cfg.train.batch_size,
        "kto": {"terms": len(kto_draws), "images": len(kto_draws), "liked_terms": int(kto_terms[lk].sum()),
                "disliked_terms": int(kto_terms[~lk].sum()),
                "terms_per_liked_label": float(kto_terms[lk].mean()),
                "terms_per_disliked_label": float(kto_terms[~lk].mean()),
                "labels_never_drawn": int((kto_terms == 0).sum()), "terms_per_label": len(kto_draws) / len(rows)},
        "dpo": {"terms": len(pair_draws), "images": 2 * len(pair_draws), "distinct_pairs_drawn": len(set(pair_draws)),
                "draws_per_pair": len(pair_draws) / len(pairs),
                "image_terms_per_liked_label": float(image_terms[lk].mean()),
                "image_terms_per_disliked_label": float(image_terms[~lk].mean()),
                "labels_never_drawn": int((image_terms == 0).sum()), "pair_terms_per_label": len(pair_draws) / len(rows)},
    }


# ------------------------------------------------------------------------------------------------ 2. gradients


def batch_losses(family, objective, batch, seed: int):
    """The objective's per-sample (per-pair) losses of one batch through the library's forward pass (the trainer's
    micro-step without the backward), and the errors behind them."""
    prompts = [objective.condition(p, d) for p, d in zip(batch.prompts, batch.desirable.tolist())]
    cond = family.condition(family.encode_prompts(prompts), batch)
    x0 = forward.clean_latents(family, batch, seed)
    errors = forward.denoising_errors(family, x0, cond, batch.draw_ids, seed, objective.plan(0, len(x0)))
    return objective.loss(errors, batch.desirable, lambda t: t, prompt_groups(batch.prompts)), errors


def flat_grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    """d loss / d params, flattened into one float64 vector (the graph is kept for the next one)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, params)])


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flat gradients."""
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-300))


def quartiles(values) -> dict:
    """Median and interquartile range of per-sample numbers (with their mean and count)."""
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "q25": float(np.quantile(v, 0.25)),
            "q75": float(np.quantile(v, 0.75)), "n": int(v.size)}


class Accumulator:
    """Per-sample gradient norms and the running sum of a family of per-sample gradients."""

    def __init__(self):
        """Empty: no norms, no sum."""
        self.norms, self.total = [], None

    def add(self, g: torch.Tensor) -> None:
        """Fold one per-sample gradient in."""
        self.norms.append(float(g.norm()))
        self.total = g.clone() if self.total is None else self.total + g

    def coherence(self) -> float:
        """||sum g_i|| / sum ||g_i||: 1 when every term points the same way, about 1/sqrt(n) when they are random."""
        return float(self.total.norm()) / sum(self.norms)


def pair_probe(family, kto, dpo, pair_batch, seed: int) -> dict:
    """Per pair i of DPO's batch: DPO's pair gradient, KTO's gradient of the liked image w_i and of the disliked image
    l_i on the same draws (noise and t), and on independent draws for l_i; norms and cosines."""
    params = family.trainable_parameters()
    d_out, d_err = batch_losses(family, dpo, pair_batch, seed)
    k_out, k_err = batch_losses(family, kto, pair_batch, seed)
    ind = replace(pair_batch, draw_ids=pair_batch.draw_ids + INDEPENDENT * (~pair_batch.desirable).long())
    i_out, _ = batch_losses(family, kto, ind, seed)
    n = len(d_out.losses)
    acc = {k: Accumulator() for k in ("dpo", "kto_liked", "kto_disliked", "kto_pair_shared", "kto_pair_independent")}
    cosines = {k: [] for k in ("liked_vs_dpo", "disliked_vs_dpo", "pair_shared_vs_dpo", "pair_independent_vs_dpo")}
    for i in range(n):
        gd, gw, gl = (flat_grad(x, params) for x in (d_out.losses[i], k_out.losses[i], k_out.losses[n + i]))
        gwi, gli = flat_grad(i_out.losses[i], params), flat_grad(i_out.losses[n + i], params)
        for key, g in (("dpo", gd), ("kto_liked", gw), ("kto_disliked", gl), ("kto_pair_shared", gw + gl),
                       ("kto_pair_independent", gwi + gli)):
            acc[key].add(g)
        for key, g in (("liked_vs_dpo", gw), ("disliked_vs_dpo", gl), ("pair_shared_vs_dpo", gw + gl),
                       ("pair_independent_vs_dpo", gwi + gli)):
            cosines[key].append(cos(g, gd))
    # each objective's batch gradient as the trainer reduces it: DPO the mean over pairs, KTO the mean over images
    dpo_total, kto_total = acc["dpo"].total / n, (acc["kto_liked"].total + acc["kto_disliked"].total) / (2 * n)
    z = sigma_weight(kto_margins(kto, k_err, pair_batch.desirable, k_out.metrics["kl"]))
    return {"norms": {k: quartiles(a.norms) for k, a in acc.items()},
            "coherence": {k: a.coherence() for k, a in acc.items()},
            "cos": {k: quartiles(v) for k, v in cosines.items()},
            "batch": {"dpo_norm": float(dpo_total.norm()), "kto_norm": float(kto_total.norm()),
                      "cos_kto_total_vs_dpo_total": cos(kto_total, dpo_total),
                      "cos_kto_liked_sum_vs_dpo_total": cos(acc["kto_liked"].total, dpo_total),
                      "cos_kto_disliked_sum_vs_dpo_total": cos(acc["kto_disliked"].total, dpo_total)},
            "kto_weight": quartiles(z), "dpo_weight": quartiles(torch.sigmoid(-dpo_margins(dpo, d_err)).numpy())}


def kto_margins(kto, errors, desirable, kl: float) -> np.ndarray:
    """KTO's z = s beta (g - Q_ref) of every sample with the Q_ref its loss used, through losses.kto_loss."""
    p, r = errors.policy.detach(), errors.reference.detach()
    return losses.kto_loss(p, r, desirable, kl, beta=kto.beta, utility=kto.utility).margins.numpy()


def dpo_margins(dpo, errors) -> torch.Tensor:
    """DPO's per-pair margins of the batch (the argument of log-sigma), through losses.dpo_loss."""
    (pw, pl), (rw, rl) = errors.policy.detach().chunk(2), errors.reference.detach().chunk(2)
    return losses.dpo_loss(pw, pl, rw, rl, beta=dpo.beta).margins


def sigma_weight(z) -> np.ndarray:
    """sigma'(z) = sigma(z)(1 - sigma(z)): the factor KTO's sigmoid utility puts on a sample's gradient (0.25 at z=0)."""
    s = 1 / (1 + np.exp(-np.asarray(z, float)))
    return s * (1 - s)


def kto_batch_probe(family, kto, kto_batch, dpo_total_fn) -> dict:
    """KTO's own first real batch (gamma 0.8): the liked and disliked parts of its batch gradient and their cosine
    with DPO's batch gradient on its own first real batch."""
    params = family.trainable_parameters()
    out, _ = batch_losses(family, kto, kto_batch, SEED)
    liked, disliked = Accumulator(), Accumulator()
    for i, d in enumerate(kto_batch.desirable.tolist()):
        (liked if d else disliked).add(flat_grad(out.losses[i], params))
    total = (liked.total + disliked.total) / len(out.losses)
    dpo_total = dpo_total_fn()
    return {"liked": len(liked.norms), "disliked": len(disliked.norms),
            "liked_part_norm": float(liked.total.norm()) / len(out.losses),
            "disliked_part_norm": float(disliked.total.norm()) / len(out.losses),
            "total_norm": float(total.norm()), "dpo_total_norm": float(dpo_total.norm()),
            "cos_total_vs_dpo_total": cos(total, dpo_total), "cos_liked_part_vs_dpo_total": cos(liked.total, dpo_total),
            "cos_disliked_part_vs_dpo_total": cos(disliked.total, dpo_total)}


def dpo_batch_gradient(family, dpo, pair_batch) -> torch.Tensor:
    """DPO's batch gradient (mean over the pairs) on its first real batch."""
    out, _ = batch_losses(family, dpo, pair_batch, SEED)
    return flat_grad(out.losses.mean(), family.trainable_parameters())


def probe_state(family, kto, dpo, pair_batch, kto_batch) -> dict:
    """Both probes at the family's current weights."""
    t = time.perf_counter()
    result = {"pairs": pair_probe(family, kto, dpo, pair_batch, SEED),
              "kto_batch": kto_batch_probe(family, kto, kto_batch, lambda: dpo_batch_gradient(family, dpo, pair_batch))}
    print(f"[why] probe {time.perf_counter() - t:.0f}s", flush=True)
    return result


# ------------------------------------------------------------------------------------------------ 3. saturation


class RecordingKTO(KTO):
    """KTO that also records every sample's margin z and whether the Q_ref clamp bound, and snapshots the weights."""

    def start(self, family) -> None:
        """Begin recording; snapshot ``family``'s weights when the MID-th micro-step starts."""
        self.family, self.log, self.snapshot = family, [], None

    def loss(self, errors, desirable, gather, groups=None):
        """KTO's loss as is; z from losses.kto_loss with the very Q_ref the loss used."""
        if len(self.log) == MID:
            self.snapshot = {k: v.detach().clone() for k, v in self.family.trainable_state().items()}
        out = super().loss(errors, desirable, gather, groups)
        p, r = errors.policy.detach(), errors.reference.detach()
        z = losses.kto_loss(p, r, desirable, out.metrics["kl"], beta=self.beta, utility=self.utility).margins
        self.log.append({"z": z.numpy().copy(), "liked": desirable.numpy().copy(),
                         "mean_g": float(losses.implicit_reward(p, r).mean()), "kl": out.metrics["kl"]})
        return out


class RecordingDPO(DPO):
    """DPO that also records every pair's margin."""

    def start(self) -> None:
        """Begin recording."""
        self.log = []

    def loss(self, errors, desirable, gather, groups=None):
        """DPO's loss as is; the margins from losses.dpo_loss."""
        out = super().loss(errors, desirable, gather, groups)
        (pw, pl), (rw, rl) = errors.policy.detach().chunk(2), errors.reference.detach().chunk(2)
        self.log.append({"m": losses.dpo_loss(pw, pl, rw, rl, beta=self.beta).margins.numpy().copy()})
        return out


def kto_saturation(log: list[dict]) -> dict:
    """Shares of KTO samples with sigma'(z) < FLAT, by side and quarter of the run; how often Q_ref is clamped."""
    quarters = np.array_split(np.arange(len(log)), 4)
    rows = []
    for q in [np.arange(len(log))] + quarters:
        z = np.concatenate([log[i]["z"] for i in q])
        liked = np.concatenate([log[i]["liked"] for i in q])
        w = sigma_weight(z)
        rows.append({"steps": f"{q[0] + 1}-{q[-1] + 1}", "samples": int(z.size), "flat": float((w < FLAT).mean()),
               "flat_wrong_side": float(((w < FLAT) & (z < 0)).mean()),
               "flat_right_side": float(((w < FLAT) & (z > 0)).mean()),
               "flat_liked": float((w[liked] < FLAT).mean()), "flat_disliked": float((w[~liked] < FLAT).mean()),
               "mean_weight_over_0.25": float(w.mean() / 0.25), "right_side": float((z > 0).mean()),
               "clamp_binds": float(np.mean([log[i]["mean_g"] < 0 for i in q])),
               "mean_Qref": float(np.mean([log[i]["kl"] for i in q]))})
    return {"steps": len(log), "threshold": FLAT, "all": rows[0], "quarters": rows[1:]}


def dpo_saturation(log: list[dict]) -> dict:
    """Shares of DPO pairs whose weight sigma(-m) is below FLAT (satisfied) or above 1 - FLAT (wrong side)."""
    quarters = np.array_split(np.arange(len(log)), 4)
    rows = []
    for q in [np.arange(len(log))] + quarters:
        m = np.concatenate([log[i]["m"] for i in q])
        w = 1 / (1 + np.exp(m))
        rows.append({"steps": f"{q[0] + 1}-{q[-1] + 1}", "pairs": int(m.size), "flat": float((w < FLAT).mean()),
                     "wrong_side_full_weight": float((w > 1 - FLAT).mean()), "right_side": float((m > 0).mean()),
                     "mean_weight_over_0.5": float(w.mean() / 0.5)})
    return {"steps": len(log), "threshold": FLAT, "all": rows[0], "quarters": rows[1:]}


def train_and_probe(out: Path, feedback: Path, parts: set[str]) -> dict:
    """The real KTO and DPO runs of seed 0 (recorded), with the gradient probes at steps 0, MID and 80."""
    kto_cfg, dpo_cfg = run_config(out, feedback, "kto", "kto"), run_config(out, feedback, "dpo", "dpo")
    kto_tr, dpo_tr = DiffusionKTOTrainer(kto_cfg), DiffusionKTOTrainer(dpo_cfg)
    kto, dpo = KTO.from_config(kto_cfg), DPO.from_config(dpo_cfg)
    pair_batch, kto_batch = next(iter(dpo_tr.loader())), next(iter(kto_tr.loader()))
    family, result = kto_tr.family, {}
    if "grads" in parts:
        result["grads"] = {"step 0": probe_state(family, kto, dpo, pair_batch, kto_batch)}
    kto_tr.objective = RecordingKTO.from_config(kto_cfg)
    kto_tr.objective.start(family)
    kto_seconds = kto_tr.train().seconds
    if "grads" in parts:
        final = {k: v.detach().clone() for k, v in family.trainable_state().items()}
        family.load_trainable_state(kto_tr.objective.snapshot)
        result["grads"][f"step {MID} of KTO"] = probe_state(family, kto, dpo, pair_batch, kto_batch)
        family.load_trainable_state(final)
        result["grads"][f"step {QUICK_STEPS} of KTO"] = probe_state(family, kto, dpo, pair_batch, kto_batch)
    if "saturation" in parts:
        dpo_tr.objective = RecordingDPO.from_config(dpo_cfg)
        dpo_tr.objective.start()
        dpo_seconds = dpo_tr.train().seconds
        result["saturation"] = {"kto": kto_saturation(kto_tr.objective.log), "dpo": dpo_saturation(dpo_tr.objective.log),
                                "train_seconds": {"kto": round(kto_seconds, 1), "dpo": round(dpo_seconds, 1)}}
    return result


# ------------------------------------------------------------------------------------------------ 4. sweep

SWEEP = {  # name -> (method, extra overrides, lr)
    "kto beta500": ("kto", ("loss.beta=500",), LR), "kto beta2000": ("kto", (), LR),
    "kto beta8000": ("kto", ("loss.beta=8000",), LR), "kto beta2000 lr1.6e-4": ("kto", (), 1.6e-4),
    "kto beta2000 batch64": ("kto", ("train.batch_size=64",), LR),
    "dpo beta500": ("dpo", ("loss.beta=500",), LR), "dpo beta2000": ("dpo", (), LR),
    "dpo beta8000": ("dpo", ("loss.beta=8000",), LR), "dpo beta2000 lr1.6e-4": ("dpo", (), 1.6e-4),
    # kto_paired with its pairs on shared draws (after the diagnosis): pair share, pair weight, beta, batch
    "kto_paired share0.5": ("kto_paired", (), LR),
    "kto_paired share1": ("kto_paired", ("loss.pair_share=1.0",), LR),
    "kto_paired share1 weight0": ("kto_paired", ("loss.pair_share=1.0", "loss.pair_weight=0"), LR),
    "kto_paired share1 batch64": ("kto_paired", ("loss.pair_share=1.0", "train.batch_size=64"), LR),
    "kto_paired share0.5 beta1000": ("kto_paired", ("loss.beta=1000",), LR),
    "kto_paired share1 beta500": ("kto_paired", ("loss.pair_share=1.0", "loss.beta=500"), LR),
    # after share1 beta500 led (0.684 at e44037b): lower beta still, and it with more pairs per step
    "kto_paired share1 beta250": ("kto_paired", ("loss.pair_share=1.0", "loss.beta=250"), LR),
    "kto_paired share1 beta500 batch64": ("kto_paired", ("loss.pair_share=1.0", "loss.beta=500", "train.batch_size=64"),
                                          LR),
    "kto beta500 batch64": ("kto", ("loss.beta=500", "train.batch_size=64"), LR),
    # beta 250 matched DPO (0.736 vs 0.731 at 28fa68a): lower still, and beta 250 with half the batch in pairs
    "kto_paired share1 beta125": ("kto_paired", ("loss.pair_share=1.0", "loss.beta=125"), LR),
    "kto_paired share1 beta60": ("kto_paired", ("loss.pair_share=1.0", "loss.beta=60"), LR),
    "kto_paired share0.5 beta250": ("kto_paired", ("loss.beta=250",), LR),
    "kto beta250": ("kto", ("loss.beta=250",), LR),
    # beta 60 led (0.836, above DPO's best 0.731): lower still, and DPO's beta grid filled in so its best is DPO's own
    "kto_paired share1 beta30": ("kto_paired", ("loss.pair_share=1.0", "loss.beta=30"), LR),
    "kto_paired share1 beta15": ("kto_paired", ("loss.pair_share=1.0", "loss.beta=15"), LR),
    "dpo beta1000": ("dpo", ("loss.beta=1000",), LR), "dpo beta4000": ("dpo", ("loss.beta=4000",), LR),
}


def validation(model_dir: Path | None) -> dict:
    """Mean preference score (and its standard error over images) on the training prompts, VAL_IMAGES fresh seeds
    each (60_000_000 + i: neither feedback, bench validation nor evaluation seeds)."""
    prompts = [p for p in world.train_prompts() for _ in range(VAL_IMAGES)]
    seeds = [60_000_000 + i for i in range(len(prompts))]
    pipe = load_pipeline("toy", device="cpu", **({"unet": str(model_dir)} if model_dir else {}))
    s = np.asarray(judges.preference(generate(pipe, prompts, seeds, batch_size=64, **SAMPLING), prompts), float)
    return {"mean": float(s.mean()), "se": float(s.std(ddof=1) / math.sqrt(s.size)), "liked": float((s >= 0.85).mean()),
            "images": int(s.size)}


def sweep(out: Path, feedback: Path, names: list[str] | None = None) -> dict:
    """Each SWEEP config trained once with TUNING_SEED for 80 steps, then validated; the base model beside them.
    Every finished config is also written to ``out``/sweep-partial.json at once (a cut-off run keeps its numbers)."""
    result = {"training_seed": TUNING_SEED, "steps": QUICK_STEPS, "base": validation(None)}
    for name in names or SWEEP:
        method, extra, lr = SWEEP[name]
        cfg = run_config(out, feedback, method, "sweep-" + name.replace(" ", "-"), *extra, seed=TUNING_SEED, lr=lr)
        seconds = DiffusionKTOTrainer(cfg).train().seconds
        result[name] = {**validation(Path(cfg.train.output_dir)), "train_seconds": round(seconds, 1)}
        print(f"[why] sweep {name}: {result[name]}", flush=True)
        (out / "sweep-partial.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    """Run the asked parts and merge their numbers into the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="counts,grads,saturation,sweep")
    ap.add_argument("--out", type=Path, default=Path("runs/why-dpo-wins"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/why-dpo-wins.json"))
    ap.add_argument("--configs", default=None, help="sweep: comma-separated SWEEP names (default: all)")
    args = ap.parse_args()
    parts, start = set(args.parts.split(",")), time.perf_counter()
    torch.manual_seed(SEED)
    run = {"commit": commit(), "machine": machine(), "torch_threads": torch.get_num_threads(),
           "command": f"python benchmarks/why_dpo_wins.py --parts {args.parts}"
                      + (f" --configs '{args.configs}'" if args.configs else "")}
    args.out.mkdir(parents=True, exist_ok=True)
    feedback = build_feedback(args.out)
    result = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if "counts" in parts:
        rows = read_feedback(feedback)
        result["counts"] = count_terms(rows, run_config(args.out, feedback, "kto", "kto"),
                                       run_config(args.out, feedback, "dpo", "dpo"))
    if parts & {"grads", "saturation"}:
        result.update(train_and_probe(args.out, feedback, parts))
    if "sweep" in parts:
        result["sweep"] = sweep(args.out, feedback, args.configs and args.configs.split(","))
    run["seconds"] = round(time.perf_counter() - start, 1)
    result.setdefault("runs", {})[args.parts] = run
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "sweep"}, indent=1)[:6000])


if __name__ == "__main__":
    main()
