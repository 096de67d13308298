"""Judges: callables ``judge(images, prompts) -> np.ndarray`` of scores, one per image, loaded from a spec.

A spec is one of:

* ``provider:name``: a judge of a registered provider (the ``diffusion_kto.scorers`` entry points, each a mapping
  of judge names to judges); this project registers ``toy``, the shapes world's judges (``toy:preference``, ...);
* ``package.module:callable`` or ``path/to/file.py:callable``: a user's judge (an attribute path such as
  ``Holder.method`` works too);
* a callable, returned as it is.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .. import registry

Judge = Callable[[Sequence, Sequence[str]], np.ndarray]
FORMS = "'provider:name', 'package.module:callable' or 'path/to/file.py:callable'"


def provider_judges(provider: str) -> Mapping[str, Judge] | None:
    """The judges a registered provider offers by name; None when no provider has that name."""
    return registry.load(registry.SCORERS, provider, error=ValueError)


def _providers() -> str:
    """The registered providers, for error messages."""
    return ", ".join(registry.names(registry.SCORERS)) or "none"


def _load_from_file(spec: str, path: str) -> object:
    """Import a Python file by path as a fresh module."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"cannot load judge {spec!r}: file {str(file)!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"dkto_user_judge_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot load judge {spec!r}: {str(file)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ValueError(f"cannot load judge {spec!r}: importing {str(file)!r} failed: {exc!r}") from exc
    return module


def _load_module(spec: str, name: str) -> object:
    """Import a module by dotted name."""
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise ValueError(f"cannot load judge {spec!r}: importing module {name!r} failed: {exc!r}") from exc


def _registered(spec: str) -> Judge | None:
    """The judge a 'provider:name' spec names, None when its prefix is no registered provider."""
    provider, sep, name = spec.partition(":")
    judges = provider_judges(provider) if sep else None
    if judges is None:
        return None
    if name not in judges:
        raise ValueError(f"cannot load judge {spec!r}: provider {provider!r} has no judge {name!r} "
                         f"(it has {', '.join(judges)})")
    return judges[name]


def load_judge(spec: str | Judge) -> Judge:
    """A judge from a registered 'provider:name', 'package.module:callable', 'path/to/file.py:callable', or a
    callable; ValueError naming the spec when it cannot be loaded."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"cannot load judge {spec!r}: expected {FORMS} (providers: {_providers()})")
    spec = spec.strip()
    judge = _registered(spec)
    if judge is not None:
        return judge
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"cannot load judge {spec!r}: not a registered judge (providers: {_providers()}) and not "
                         "of the form 'package.module:callable' or 'path/to/file.py:callable'")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    obj = _load_from_file(spec, target) if is_file else _load_module(spec, target)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"cannot load judge {spec!r}: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"cannot load judge {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj
