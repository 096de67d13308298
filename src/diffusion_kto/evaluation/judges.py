"""Judges: callables ``judge(images, prompts) -> np.ndarray`` of scores, one per image, loaded from a spec.

A spec is one of:

* ``provider:name``: a judge of a registered provider (the ``diffusion_kto.scorers`` entry points, each a mapping
  of judge names to judges); this project registers ``toy``, the shapes world's judges (``toy:preference``, ...);
* ``package.module:callable`` or ``path/to/file.py:callable``: a user's judge (an attribute path such as
  ``Holder.method`` works too);
* a callable.

Every loaded judge is checked on every call (:func:`check_scores`): one finite score per image, within the bounds
the caller asks for (the demo's and the loop's judges score in [0, 1]); anything else stops with a one-line
:class:`JudgeError` naming the judge, before its scores can become labels.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .. import registry
from ..errors import UserError

Judge = Callable[[Sequence, Sequence[str]], np.ndarray]
FORMS = "'provider:name', 'package.module:callable' or 'path/to/file.py:callable'"


class JudgeError(UserError, ValueError):
    """A judge cannot be loaded, or returned scores that cannot be used; the message names the judge."""


def check_scores(scores, n: int, name: str, bounds: tuple[float, float] | None = None) -> np.ndarray:
    """``scores`` as a float array of exactly ``n`` finite values (within ``bounds`` when given); JudgeError naming the
    judge, the problem and the first offending image otherwise."""
    try:
        values = np.asarray(scores, dtype=np.float64).ravel()
    except (TypeError, ValueError) as err:
        raise JudgeError(f"judge {name!r} returned scores that are not numbers ({err})") from None
    if values.shape != (n,):
        raise JudgeError(f"judge {name!r} returned {values.size} scores for {n} images; it must return one per image")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise JudgeError(f"judge {name!r} returned {bad.size} non-finite scores (NaN or inf), the first for image "
                         f"{bad[0]}: {values[bad[0]]}")
    if bounds is not None:
        low, high = bounds
        out = np.flatnonzero((values < low) | (values > high))
        if out.size:
            raise JudgeError(f"judge {name!r} returned {out.size} scores outside [{low:g}, {high:g}], the first "
                             f"for image {out[0]}: {values[out[0]]:g}")
    return values


class CheckedJudge:
    """A judge whose every call is checked by :func:`check_scores`."""

    def __init__(self, judge: Judge, name: str, bounds: tuple[float, float] | None = None):
        self.judge, self.name, self.bounds = judge, name, bounds

    def __call__(self, images: Sequence, prompts: Sequence[str]) -> np.ndarray:
        """The judge's scores of ``images`` for ``prompts``, checked."""
        return check_scores(self.judge(images, prompts), len(images), self.name, self.bounds)


def provider_judges(provider: str) -> Mapping[str, Judge] | None:
    """The judges a registered provider offers by name; None when no provider has that name."""
    return registry.load(registry.SCORERS, provider, error=JudgeError)


def _providers() -> str:
    """The registered providers, for error messages."""
    return ", ".join(registry.names(registry.SCORERS)) or "none"


def _load_from_file(spec: str, path: str) -> object:
    """Import a Python file by path as a fresh module."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise JudgeError(f"cannot load judge {spec!r}: file {str(file)!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"dkto_user_judge_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise JudgeError(f"cannot load judge {spec!r}: {str(file)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise JudgeError(f"cannot load judge {spec!r}: importing {str(file)!r} failed: {exc!r}") from exc
    return module


def _load_module(spec: str, name: str) -> object:
    """Import a module by dotted name."""
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise JudgeError(f"cannot load judge {spec!r}: importing module {name!r} failed: {exc!r}") from exc


def _registered(spec: str) -> Judge | None:
    """The judge a 'provider:name' spec names, None when its prefix is no registered provider."""
    provider, sep, name = spec.partition(":")
    judges = provider_judges(provider) if sep else None
    if judges is None:
        return None
    if name not in judges:
        raise JudgeError(f"cannot load judge {spec!r}: provider {provider!r} has no judge {name!r} "
                         f"(it has {', '.join(judges)})")
    return judges[name]


def load_judge(spec: str | Judge, bounds: tuple[float, float] | None = None) -> CheckedJudge:
    """A checked judge (:class:`CheckedJudge`, scores within ``bounds`` when given) from a registered
    'provider:name', 'package.module:callable', 'path/to/file.py:callable', or a callable; JudgeError naming the
    spec when it cannot be loaded."""
    if isinstance(spec, CheckedJudge):
        return CheckedJudge(spec.judge, spec.name, bounds)
    if callable(spec):
        return CheckedJudge(spec, getattr(spec, "__name__", repr(spec)), bounds)
    return CheckedJudge(_load(spec), spec.strip(), bounds)


def _load(spec: str) -> Judge:
    """The unchecked judge a spec names."""
    if not isinstance(spec, str) or not spec.strip():
        raise JudgeError(f"cannot load judge {spec!r}: expected {FORMS} (providers: {_providers()})")
    spec = spec.strip()
    judge = _registered(spec)
    if judge is not None:
        return judge
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise JudgeError(f"cannot load judge {spec!r}: not a registered judge (providers: {_providers()}) and not "
                         "of the form 'package.module:callable' or 'path/to/file.py:callable'")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    obj = _load_from_file(spec, target) if is_file else _load_module(spec, target)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise JudgeError(f"cannot load judge {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise JudgeError(f"cannot load judge {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj
