"""Prompt sets for evaluation: local files, registered sets (the toy world's held-out prompts), and the paper's
benchmark sets.

``load_prompts(spec)`` accepts:

* a registered set (entry point group ``diffusion_kto.prompts``: a callable returning the prompts): ``toy`` is the
  shapes world's held-out prompts (``toy.world.eval_prompts()``), disjoint from its training prompts.
* a path to a ``.txt`` file (one prompt per line; blank lines are skipped), a ``.jsonl`` file (one JSON object per
  line with a ``prompt``, ``caption`` or ``text`` field, or a bare JSON string), or a ``.csv`` file (a header row
  with a ``prompt``, ``caption`` or ``text`` column; an optional ``category`` column is kept).
* the paper's sets (Diffusion-KTO, arXiv 2404.04465, §5), downloaded once and then read from a local cache:

  ============  ==========================================  ===========================================
  spec          source                                      what
  ============  ==========================================  ===========================================
  ``pickapic``  ``yuvalkirstain/pickapic_v2_no_images``     split ``test_unique``, column ``caption``
                (``datasets``)                              (500 captions; the paper's 2500 = 500 × 5)
  ``parti``     ``nateraw/parti-prompts`` (``datasets``)    split ``train``, columns ``Prompt``, ``Category``
  ``hps``       ``zhwang/HPDv2`` dataset repo, files        the HPS v2 benchmark prompts (what
                ``benchmark/{anime,concept-art,paintings,   ``hpsv2.benchmark_prompts('all')`` reads);
                photo}.json`` (``huggingface_hub``)         ``hps:photo`` picks one style
  ============  ==========================================  ===========================================

  ``pickapic:validation_unique`` picks another split. The cache is ``$DKTO_CACHE/prompts`` (default
  ``~/.cache/diffusion-kto/prompts``): one JSON file per set, so later runs work offline. Offline without a
  cached copy, the error says which dataset to fetch and how to pass a local file instead.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import registry
from ..errors import UserError

PROMPT_FIELDS = ("prompt", "caption", "text")
HUB_SETS = {
    "pickapic": {"dataset": "yuvalkirstain/pickapic_v2_no_images", "split": "test_unique", "column": "caption",
                 "category": None},
    "parti": {"dataset": "nateraw/parti-prompts", "split": "train", "column": "Prompt", "category": "Category"},
    "hps": {"dataset": "zhwang/HPDv2", "split": "all", "column": None, "category": "style"},
}
HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


class PromptError(UserError, ValueError):
    """A prompt set that cannot be read: names the file and line, or the dataset and what to do."""


@dataclass(frozen=True)
class PromptSet:
    """Prompts in a fixed order, where they came from, and an optional category per prompt."""

    name: str
    prompts: list[str]
    source: str
    categories: list[str] | None = field(default=None)

    def __len__(self) -> int:
        """Number of prompts."""
        return len(self.prompts)

    def head(self, limit: int | None) -> PromptSet:
        """The first `limit` prompts (all when limit is None)."""
        if limit is None:
            return self
        if limit < 1:
            raise PromptError(f"the number of prompts must be at least 1, got {limit}")
        cats = None if self.categories is None else self.categories[:limit]
        return PromptSet(self.name, self.prompts[:limit], self.source, cats)


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Where downloaded prompt sets are kept: root, else $DKTO_CACHE/prompts, else ~/.cache/diffusion-kto/prompts."""
    if root is not None:
        return Path(root)
    base = os.environ.get("DKTO_CACHE") or Path.home() / ".cache" / "diffusion-kto"
    return Path(base) / "prompts"


# ---------------------------------------------------------------- local files

def _clean(text, where: str) -> str:
    """A prompt stripped of surrounding whitespace; PromptError naming `where` when empty or not a string."""
    if not isinstance(text, str):
        raise PromptError(f"{where}: the prompt must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise PromptError(f"{where}: the prompt is empty")
    return text


def read_txt(path: Path) -> PromptSet:
    """One prompt per line; blank lines are skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    return PromptSet(path.stem, prompts, str(path))


def _jsonl_prompt(value, where: str) -> tuple[str, str | None]:
    """(prompt, category) from one JSONL value: a string, or an object with a prompt/caption/text field."""
    if isinstance(value, str):
        return _clean(value, where), None
    if not isinstance(value, dict):
        raise PromptError(f"{where}: expected a JSON object or string, got {type(value).__name__}")
    key = next((k for k in PROMPT_FIELDS if k in value), None)
    if key is None:
        raise PromptError(f"{where}: no prompt field (expected one of {list(PROMPT_FIELDS)}, got {sorted(value)})")
    category = value.get("category")
    return _clean(value[key], where), None if category is None else str(category)


def read_jsonl(path: Path) -> PromptSet:
    """One JSON object (with a prompt/caption/text field) or JSON string per line."""
    prompts, categories = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        prompt, category = _jsonl_prompt(value, where)
        prompts.append(prompt)
        categories.append(category)
    cats = categories if any(c is not None for c in categories) else None
    return PromptSet(path.stem, prompts, str(path), cats)


def read_csv(path: Path) -> PromptSet:
    """A CSV with a header row naming a prompt/caption/text column (and optionally a category column)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        lower = {h.lower(): raw for h, raw in zip(header, reader.fieldnames or [])}
        key = next((lower[k] for k in PROMPT_FIELDS if k in lower), None)
        if key is None:
            raise PromptError(f"{path}, line 1: the header {header} has no prompt column "
                              f"(expected one of {list(PROMPT_FIELDS)})")
        cat_key = lower.get("category")
        prompts, categories = [], []
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if row.get(key) is None:
                raise PromptError(f"{where}: the row has fewer columns than the header")
            prompts.append(_clean(row[key], where))
            categories.append(row.get(cat_key) if cat_key else None)
    cats = categories if cat_key else None
    return PromptSet(path.stem, prompts, str(path), cats)


READERS = {".txt": read_txt, ".jsonl": read_jsonl, ".csv": read_csv}


def read_file(path: str | os.PathLike) -> PromptSet:
    """A prompt set from a .txt, .jsonl or .csv file."""
    file = Path(path).expanduser()
    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise PromptError(f"{file}: unsupported prompt file type {file.suffix!r} (use {', '.join(READERS)})")
    if not file.is_file():
        raise PromptError(f"{file}: prompt file not found")
    try:
        result = reader(file)
    except UnicodeDecodeError as err:
        raise PromptError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not result.prompts:
        raise PromptError(f"{file}: no prompts in the file")
    return result


# ---------------------------------------------------------------- hub sets

def _offline_help(name: str, source: str, cache: Path, err: BaseException) -> PromptError:
    """The error for a hub prompt set that could not be fetched."""
    return PromptError(
        f"could not fetch the {name!r} prompt set from the Hugging Face Hub ({source}): {type(err).__name__}: {err}. "
        f"Offline? Run once with network access (HF_HUB_OFFLINE unset) to fill the cache at {cache}, "
        f"or pass a local .txt/.jsonl/.csv file to --prompts.")


def _need(module: str, package: str, name: str):
    """Import an optional module or raise PromptError saying which pip package to install."""
    try:
        return __import__(module)
    except ImportError:
        raise PromptError(f"the {name!r} prompt set needs the {package!r} package: pip install {package} "
                          "(or pip install 'diffusion-kto[eval]')") from None


def _dedupe(prompts: list[str], categories: list[str] | None) -> tuple[list[str], list[str] | None]:
    """Prompts with repeats removed (first occurrence kept), in order; categories follow."""
    seen, keep = set(), []
    for i, p in enumerate(prompts):
        if p not in seen:
            seen.add(p)
            keep.append(i)
    return [prompts[i] for i in keep], None if categories is None else [categories[i] for i in keep]


def fetch_datasets_set(name: str, split: str) -> tuple[list[str], list[str] | None, str]:
    """Prompts (and categories) of a `datasets` hub set: (prompts, categories, source)."""
    info = HUB_SETS[name]
    datasets = _need("datasets", "datasets", name)
    source = f"{info['dataset']} split {split}"
    ds = datasets.load_dataset(info["dataset"], split=split)
    columns = [c for c in (info["column"], info["category"]) if c]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise PromptError(f"{source}: columns {missing} not found (has {ds.column_names})")
    prompts = [str(p).strip() for p in ds[info["column"]]]
    categories = [str(c) for c in ds[info["category"]]] if info["category"] else None
    return prompts, categories, source


def fetch_hps(split: str) -> tuple[list[str], list[str], str]:
    """The HPS v2 benchmark prompts of one style or 'all' styles, from the zhwang/HPDv2 dataset repo."""
    styles = HPS_STYLES if split == "all" else (split,)
    unknown = [s for s in styles if s not in HPS_STYLES]
    if unknown:
        raise PromptError(f"unknown HPS v2 style {unknown[0]!r}; choose one of {list(HPS_STYLES)} or 'all'")
    hub = _need("huggingface_hub", "huggingface_hub", "hps")
    prompts, categories = [], []
    for style in styles:
        path = hub.hf_hub_download(HUB_SETS["hps"]["dataset"], f"{style}.json", subfolder="benchmark",
                                   repo_type="dataset")
        items = json.loads(Path(path).read_text(encoding="utf-8"))
        prompts += [str(p).strip() for p in items]
        categories += [style] * len(items)
    return prompts, categories, f"{HUB_SETS['hps']['dataset']} benchmark/{'+'.join(styles)}.json"


def load_hub_set(name: str, split: str | None = None, *, cache: str | os.PathLike | None = None,
                 refresh: bool = False) -> PromptSet:
    """One of the paper's prompt sets, from the local cache or else downloaded (and then cached)."""
    info = HUB_SETS[name]
    split = split or info["split"]
    folder = cache_dir(cache)
    file = folder / f"{name}-{split}.json"
    if file.is_file() and not refresh:
        data = json.loads(file.read_text(encoding="utf-8"))
        return PromptSet(f"{name}:{split}", data["prompts"], data["source"], data.get("categories"))
    try:
        if name == "hps":
            prompts, categories, source = fetch_hps(split)
        else:
            prompts, categories, source = fetch_datasets_set(name, split)
    except PromptError:
        raise
    except Exception as err:  # network, auth, missing split: one clear message
        raise _offline_help(name, f"{info['dataset']} {split}", folder, err) from err
    prompts, categories = _dedupe(prompts, categories)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"source": source, "prompts": prompts, "categories": categories}), encoding="utf-8")
    os.replace(tmp, file)
    return PromptSet(f"{name}:{split}", prompts, source, categories)


# ---------------------------------------------------------------- entry point

def load_prompts(spec: str, *, limit: int | None = None, cache: str | os.PathLike | None = None) -> PromptSet:
    """A prompt set from a registered name ('toy'), 'pickapic[:split]', 'parti', 'hps[:style]' or a .txt/.jsonl/.csv
    path."""
    spec = str(spec).strip()
    registered = registry.load(registry.PROMPTS, spec, error=PromptError)
    if registered is not None:
        source = registry.source(registry.PROMPTS, spec).replace(":", ".") + "()"
        return PromptSet(spec, list(registered()), source).head(limit)
    name, _, split = spec.partition(":")
    if name in HUB_SETS and not Path(spec).exists():
        return load_hub_set(name, split or None, cache=cache).head(limit)
    if Path(spec).suffix.lower() in READERS or Path(spec).exists():
        return read_file(spec).head(limit)
    sets = ", ".join(repr(k) for k in [*registry.names(registry.PROMPTS), *HUB_SETS])
    raise PromptError(f"unknown prompt set {spec!r}: use {sets} "
                      f"(optionally ':split'), or a path to a {'/'.join(READERS)} file")
