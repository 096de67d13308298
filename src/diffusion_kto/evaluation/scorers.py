"""Reward models that score (image, prompt) pairs: a registry of the paper's five metrics and of registered
judges.

Every scorer is ``Scorer(name, load)`` where ``load(path_or_id, device, **options)`` returns a callable
``score(images, prompts) -> np.ndarray`` (one float per image, higher is better), batched, on CPU or GPU.
``path_or_id`` is a local folder/file or a Hugging Face Hub id; ``None`` means the default below.

===============  ==========================================================  ==================================
name             what (Diffusion-KTO §5 uses all five real ones)             default weights / needs
===============  ==========================================================  ==================================
``pickscore``    logit_scale · cos(text, image) of the PickScore CLIP-H       ``yuvalkirstain/PickScore_v1``,
                 (Kirstain et al. 2023); about 20-22 for SD 1.5               processor
                                                                              ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``
``clip``         CLIP score: 100 · max(cos(text, image), 0); about 30 for SD  ``openai/clip-vit-large-patch14``
``aesthetic``    LAION improved aesthetic predictor: an MLP on the            head ``trl-lib/ddpo-aesthetic-predictor``
                 L2-normalised CLIP ViT-L/14 image embedding; 1-10 scale      / ``aesthetic-model.pth``, or the
                                                                              published ``sac+logos+ava1-l14-linearMSE.pth``
``hpsv2``        HPS v2 / v2.1: cos(text, image) of an OpenCLIP ViT-H-14      ``xswu/HPSv2`` ``HPS_v2.1_compressed.pt``
                 fine-tuned on HPD v2; about 0.25-0.35                        (``hpsv2=v2.0`` for v2); ``open_clip_torch``
``imagereward``  ImageReward (BLIP-based), normalised reward                  ``ImageReward-v1.0``; ``image-reward``
``P:<judge>``    a judge of a registered provider ``P`` (entry point group     no weights, no extra packages
                 ``diffusion_kto.scorers``), e.g. the shapes world's
                 ``toy:preference``; or ``P:module:callable`` /
                 ``P:file.py:callable``: a user's judge
===============  ==========================================================  ==================================

Options (keyword arguments of ``load``; on the command line ``--metric-option NAME.KEY=VALUE``):
``batch_size`` (all), ``dtype`` (``float32``/``float16``/``bfloat16``, model scorers), ``processor``
(pickscore, clip: a processor folder or id when the model folder has none), ``clip`` (aesthetic: the CLIP
backbone), ``arch`` (hpsv2: an OpenCLIP architecture name or a model-config JSON file).
A missing package or missing weights raises :class:`ScorerError` saying what to install or download. The loaders
live in :mod:`diffusion_kto.evaluation.reward_models`; judges are loaded by :mod:`diffusion_kto.evaluation.judges`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .. import registry
from .judges import load_judge
from .reward_models import (
    AESTHETIC_HEAD_FILE,
    AESTHETIC_HEAD_REPO,
    CLIP_MODEL,
    HPS_FILES,
    HPS_REPO,
    IMAGEREWARD_MODEL,
    PICKSCORE_MODEL,
    ScoreFn,
    ScorerError,
    batches,
    check_pairs,
    aesthetic_head,
    load_aesthetic,
    load_aesthetic_head,
    load_clip,
    load_hpsv2,
    load_imagereward,
    load_pickscore,
    resolve_device,
)

__all__ = ["Metric", "SCORERS", "Scorer", "ScorerError", "aesthetic_head", "get_scorer", "load_aesthetic",
           "load_aesthetic_head", "load_clip", "load_hpsv2", "load_imagereward", "load_judge_scorer", "load_pickscore",
           "parse_metric", "parse_metrics", "resolve_device"]


@dataclass(frozen=True)
class Scorer:
    """A registered reward model: load(path_or_id, device, **options) -> score(images, prompts) -> (N,) array."""

    name: str
    load: Callable[..., ScoreFn]
    description: str = ""
    default: str | None = None
    packages: tuple[str, ...] = ()
    higher_is_better: bool = True


@dataclass
class Metric:
    """One metric of an evaluation: a scorer, the weights to load, options, and its label in the tables."""

    label: str
    scorer: Scorer
    weights: str | None = None
    options: dict = field(default_factory=dict)

    def load(self, device: str | None = None) -> ScoreFn:
        """The loaded score function on device (default: CUDA when available)."""
        return self.scorer.load(self.weights, resolve_device(device), **self.options)

    def describe(self) -> dict:
        """A JSON-ready record of what this metric is."""
        return {"label": self.label, "scorer": self.scorer.name, "weights": self.weights or self.scorer.default,
                "options": {k: str(v) for k, v in self.options.items()},
                "higher_is_better": self.scorer.higher_is_better}


# ---------------------------------------------------------------- judges of registered providers

def load_judge_scorer(provider: str, judge: str, device: str = "cpu", *, batch_size: int = 4096) -> ScoreFn:
    """A judge of a registered provider (``toy`` + ``preference``) as a batched scorer; a judge given as
    ``module:callable`` or ``file.py:callable`` after the provider's prefix is the user's own."""
    try:
        fn = load_judge(judge if ":" in judge else f"{provider}:{judge}")
    except ValueError as err:
        raise ScorerError(str(err)) from None
    size = int(batch_size)

    def score(images, prompts) -> np.ndarray:
        check_pairs(images, prompts)
        parts = [np.asarray(fn(images[s], list(prompts[s])), dtype=np.float64).ravel()
                 for s in batches(len(images), size)]
        return np.concatenate(parts) if parts else np.zeros(0)

    return score


# ---------------------------------------------------------------- registry

SCORERS: dict[str, Scorer] = {
    "pickscore": Scorer("pickscore", load_pickscore, "PickScore (CLIP-H fine-tuned on Pick-a-Pic)",
                        PICKSCORE_MODEL, ("transformers",)),
    "clip": Scorer("clip", load_clip, "CLIP score, 100·max(cos, 0)", CLIP_MODEL, ("transformers",)),
    "aesthetic": Scorer("aesthetic", load_aesthetic, "LAION improved aesthetic predictor (CLIP ViT-L/14 + MLP)",
                        f"{AESTHETIC_HEAD_REPO}/{AESTHETIC_HEAD_FILE}", ("transformers",)),
    "hpsv2": Scorer("hpsv2", load_hpsv2, "Human Preference Score v2.1 (OpenCLIP ViT-H-14)",
                    f"{HPS_REPO}/{HPS_FILES['v2.1']}", ("open_clip_torch",)),
    "imagereward": Scorer("imagereward", load_imagereward, "ImageReward (BLIP)", IMAGEREWARD_MODEL,
                          ("image-reward",)),
}


def get_scorer(name: str) -> tuple[Scorer, str | None]:
    """(scorer, implied weights) for a registry name or '<provider>:<judge>'; ScorerError listing names otherwise."""
    if name in SCORERS:
        return SCORERS[name], None
    providers = registry.names(registry.SCORERS)
    provider, sep, judge = name.partition(":")
    if sep and provider in providers:
        if not judge:
            raise ScorerError(f"'{provider}:' needs a judge name, e.g. {provider}:preference")
        return Scorer(name, partial(load_judge_scorer, provider), f"{provider} judge {judge}", judge), judge
    judges = " or ".join(f"{p}:<judge>" for p in providers) or "no judge providers registered"
    example = f" (e.g. {providers[0]}:preference)" if providers else ""
    raise ScorerError(f"unknown metric {name!r}; available: {', '.join(SCORERS)}, or {judges}{example}")


def parse_metric(spec: str) -> Metric:
    """A Metric from 'name' or 'name=path_or_id' (toy judges: 'toy:<judge>')."""
    spec = spec.strip()
    name, sep, weights = spec.partition("=")
    name = name.strip()
    scorer, implied = get_scorer(name)
    if sep and not weights.strip():
        raise ScorerError(f"metric {spec!r}: nothing after '='; give a folder, file or hub id")
    return Metric(name, scorer, weights.strip() if sep else implied)


def parse_metrics(specs: Sequence[str], options: Sequence[str] = ()) -> list[Metric]:
    """Metrics from comma-separated specs, with 'label.key=value' options applied; labels made unique."""
    metrics = [parse_metric(s) for text in specs for s in text.split(",") if s.strip()]
    if not metrics:
        raise ScorerError("no metrics given")
    names = [m.label for m in metrics]
    for m in metrics:
        if names.count(m.label) > 1 and m.weights:
            m.label = f"{m.label}={m.weights}"
    labels = [m.label for m in metrics]
    if len(set(labels)) != len(labels):
        raise ScorerError(f"metric listed twice: {labels}")
    by_name = {m.label: m for m in metrics} | {m.scorer.name: m for m in metrics}
    for option in options:
        key, sep, value = option.partition("=")
        target, dot, field_name = key.strip().rpartition(".")
        if not sep or not dot or target not in by_name:
            raise ScorerError(f"metric option {option!r}: expected METRIC.KEY=VALUE with METRIC one of {labels}")
        by_name[target].options[field_name] = value.strip()
    return metrics
