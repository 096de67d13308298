"""Named providers declared as Python entry points, so that a module can use what another package (or a higher
layer of this one) offers without importing it.

Groups: ``diffusion_kto.models`` (model aliases: a callable returning a pipeline folder), ``diffusion_kto.scorers``
(judge providers: a mapping of judge names to ``judge(images, prompts) -> scores``) and ``diffusion_kto.prompts``
(prompt sets: a callable returning a list of prompts). A package declares them in its pyproject.toml::

    [project.entry-points."diffusion_kto.models"]
    toy = "diffusion_kto.toy:weights_dir"

This project declares the shapes world's (``toy``) in each group; they are seen once the package is installed
(``pip install -e .``)."""
from __future__ import annotations

from importlib import metadata

MODELS = "diffusion_kto.models"
SCORERS = "diffusion_kto.scorers"
PROMPTS = "diffusion_kto.prompts"


def _entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    """The entry points of one group by name."""
    return {ep.name: ep for ep in metadata.entry_points(group=group)}


def names(group: str) -> list[str]:
    """The names registered in a group, sorted (nothing is imported)."""
    return sorted(_entry_points(group))


def source(group: str, name: str) -> str | None:
    """Where a name points, as ``module:attribute``; None when it is not registered."""
    ep = _entry_points(group).get(name)
    return None if ep is None else ep.value


def load(group: str, name: str, error: type[Exception] = LookupError) -> object | None:
    """What ``name`` is registered as in ``group``, None when nothing is; ``error`` (one line) when its provider is
    registered but cannot be imported, e.g. because the package that provides it was removed."""
    ep = _entry_points(group).get(name)
    if ep is None:
        return None
    try:
        return ep.load()
    except Exception as err:  # ImportError, AttributeError, or whatever the provider's import raised
        detail = " ".join(str(err).split())
        raise error(f"{name!r} is registered in {group} as {ep.value!r}, which cannot be loaded "
                    f"({type(err).__name__}: {detail}); reinstall the package that provides it") from None
