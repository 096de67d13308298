"""Where model weights come from, read by one rule and named in every error: a local folder or a hub id.

- An existing path is a local folder. A string that has the shape of a hub repo id (``name`` or ``owner/name``)
  and is not an existing path is a hub id. Anything else (``./nope``, ``/abs/missing``, ``~/x``) is a folder that does
  not exist. A missing folder or an unreachable hub id is one line naming the config key (or flag), how the name was
  read, and what to check -- never a chained traceback from diffusers or huggingface_hub.
- Weights load from safetensors only: diffusers and transformers would otherwise fall back to pickled ``.bin`` files
  of a folder, which can run code when unpickled. ``allow_pickle`` (``model.allow_pickle=true``) lifts that for
  people who trust their files.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import ConfigError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # `name` or `owner/name`
OFFLINE_HINT = "HF_HUB_OFFLINE=1 is set: only models already in the local hub cache can be used"


def is_hub_id(name: str) -> bool:
    """Whether a model name that is not an existing path reads as a hub id (otherwise it is a missing folder)."""
    return not Path(name).expanduser().exists() and bool(HUB_ID.fullmatch(name)) and not name.startswith(".")


def _offline() -> bool:
    """Whether huggingface_hub is told not to reach the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def locate(name: str, key: str, *, revision: str | None = None, marker: str = "model_index.json") -> str:
    """The folder (``~`` expanded) or hub id ``name`` names, checked to hold ``marker``; ConfigError naming ``key``
    otherwise (a missing folder or file, or a hub id that is neither cached nor reachable)."""
    if not is_hub_id(name):
        folder = Path(name).expanduser()
        if not folder.exists():
            raise ConfigError(f"{key}: {name!r} was read as a local folder, and there is no such folder; check the "
                              "path (a hub id has the form owner/name)")
        if marker and not (folder / marker).exists():
            raise ConfigError(f"{key}: {name!r} was read as a local folder, but it has no {marker}; is it a "
                              "diffusers folder (save_pretrained output)?")
        return str(folder)
    _hub_file(name, key, marker, revision)
    return name


def _hub_file(repo: str, key: str, filename: str, revision: str | None) -> None:
    """Fetch (or find in the local cache) one file of a hub repo, turning every failure into one line."""
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo, filename, revision=revision, local_files_only=_offline())
    except Exception as err:  # LocalEntryNotFound, RepositoryNotFound, Offline, HTTP, validation errors
        why = OFFLINE_HINT if _offline() else f"{type(err).__name__}: {_first_line(err)}"
        raise ConfigError(f"{key}: {repo!r} was read as a hub id, and its {filename} cannot be had ({why}); check "
                          "the id, the network, HF_HUB_OFFLINE and the local cache, or give a local diffusers folder"
                          ) from None


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message."""
    return (str(err).strip().splitlines() or [""])[0][:300]


def weight_kwargs(allow_pickle: bool) -> dict:
    """``from_pretrained`` keywords that load safetensors only (None: the libraries' default, which falls back to
    pickled .bin files, only when the user allows pickles)."""
    return {"use_safetensors": None if allow_pickle else True}


def loading_error(err: BaseException, key: str, name: str, allow_pickle: bool) -> ConfigError | None:
    """A one-line ConfigError for a ``from_pretrained`` failure a user can fix (no safetensors weights, a missing
    component file), or None for anything else (a real bug: let it raise)."""
    text = _first_line(err)
    if not isinstance(err, (OSError, EnvironmentError, ValueError)):
        return None
    if not allow_pickle and ("safetensors" in text or ".bin" in text or "no file named" in text):
        return ConfigError(f"{key}: {name!r} has no safetensors weights for a component ({text}); convert the .bin "
                           "files to safetensors, or set model.allow_pickle=true if you trust them (unpickling can "
                           "run code)")
    if "no file named" in text or "does not appear to have a file" in text or "couldn't connect" in text.lower():
        return ConfigError(f"{key}: {name!r} is incomplete or unreachable ({text})")
    return None


class _ProcessorFallbackNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL version without torchvision."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for that notice only."""
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


@contextlib.contextmanager
def quiet_processor_fallback() -> Iterator[None]:
    """Silence transformers' torchvision-fallback notice while a diffusion pipeline loads: diffusers looks up image
    processor classes of components this project never uses (safety checker, feature extractor), so the PIL fallback
    is the intended path there. Scorers that do preprocess images keep the notice."""
    target = logging.getLogger("transformers.utils.import_utils")
    notice = _ProcessorFallbackNotice()
    target.addFilter(notice)
    try:
        yield
    finally:
        target.removeFilter(notice)
