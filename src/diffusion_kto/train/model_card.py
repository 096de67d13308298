"""The model card of a run: ``<output_dir>/README.md`` in the format the Hugging Face hub displays.

The hub reads YAML front matter between two ``---`` lines at the top of a repo's README.md (``base_model``, ``tags``,
``license``, ``library_name``, ``pipeline_tag``), then shows the markdown below it. The card says which base model was
trained with which objective and settings, on what data (liked and disliked counts, bad rows skipped), shows a sample
grid, says how to load the weights with diffusers, and holds evaluation results between two markers, filled in by
``dkto demo`` and ``dkto eval`` (:func:`add_eval_results`) when they evaluate the run.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import Config
from ..models import resolve_pretrained

CARD = "README.md"
CARD_GRID = "samples.png"  # the grid a run without validation images draws for its card
CARD_PROMPTS = 4  # prompts of that grid
EVAL_START, EVAL_END = "<!-- dkto:eval -->", "<!-- /dkto:eval -->"
NO_EVAL = ("No evaluation yet. `dkto eval --models run=BASE+RUN_DIR base=BASE ...` (docs/evaluation.md) writes its "
           "win rates here.")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# the settings a card lists (the whole resolved config is config.yaml beside it)
SETTINGS = ("loss.name", "loss.beta", "loss.utility", "loss.reference_point", "loss.desirable_weight",
            "loss.undesirable_weight", "data.desirable_ratio", "data.caption_dropout", "data.resolution", "lora.rank",
            "optim.lr", "optim.lr_scheduler", "optim.warmup_steps", "optim.max_grad_norm", "train.max_steps",
            "train.batch_size", "train.grad_accum", "train.mixed_precision", "train.seed")


@dataclass(frozen=True)
class RunFacts:
    """What a finished run tells its card beyond its config."""

    steps: int
    exported: list[str]  # the paths the family's export wrote
    processes: int = 1
    data: Any = None  # FeedbackSummary of the rows trained on; None when rows were passed in, or streamed
    rows: tuple[int, int] | None = None  # (liked, disliked) of rows passed in through the Python API
    stream_skipped: int | None = None  # data.streaming: bad rows the readers skipped
    grid: Path | None = None  # the sample grid, inside the run folder
    skipped_steps: int = 0


def card_prompts(cfg: Config, rows, components: tuple[str, ...]) -> list[str]:
    """The prompts of the grid a run draws for its card: log.validation_prompts, else the first distinct prompts of its
    rows; none when it cannot sample (no VAE or text encoder loaded: data.cache) or knows no prompts (streaming)."""
    if not {"vae", "text_encoder"} <= set(components):
        return []
    prompts = cfg.log.validation_prompts or list(dict.fromkeys(r.prompt for r in rows or ()))
    return list(prompts[:CARD_PROMPTS])


def _setting(cfg: Config, key: str) -> Any:
    """The value of a dotted config key."""
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def base_model(cfg: Config) -> tuple[str | None, str]:
    """(hub id or None, what to load the base from): a registered alias (``toy``) and a local folder load from their
    folder, a hub id from the hub."""
    name = cfg.model.pretrained
    folder = resolve_pretrained(name)
    if folder != name or Path(name).expanduser().exists() or not _HUB_ID.fullmatch(name):
        return None, folder
    return name, name


def base_license(cfg: Config) -> str:
    """The base model's license from its own card (a local folder's README.md, or the hub card in the local cache);
    "other" when it is not known here."""
    hub_id, source = base_model(cfg)
    card = Path(source) / CARD
    if hub_id is not None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(hub_id, CARD, revision=cfg.model.revision)
        except Exception:  # noqa: BLE001 (an unusual cache layout or id: the license stays unknown)
            cached = None
        card = Path(cached) if isinstance(cached, str) else card
    return str(read_front_matter(card).get("license") or "other")


def read_front_matter(path: Path) -> dict:
    """The YAML front matter of a markdown file ({} when it has none or cannot be read)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    try:
        data = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def front_matter(cfg: Config, lora: bool) -> dict:
    """The hub's metadata: base model (hub ids only), tags, license, library and pipeline."""
    hub_id, _ = base_model(cfg)
    tags = ["diffusers", "text-to-image", "diffusion-kto", cfg.loss.name, "lora" if lora else "full-fine-tune"]
    meta = {"base_model": hub_id} if hub_id else {}
    return {**meta, "library_name": "diffusers", "pipeline_tag": "text-to-image", "license": base_license(cfg),
            "tags": list(dict.fromkeys(tags))}


def loading_code(cfg: Config, out: Path, exported: list[str]) -> str:
    """Python that loads the exported weights with diffusers: LoRA adapters on the base pipeline, or the trained
    component (a folder the family exported, e.g. ``unet/``) in place of the base's."""
    hub_id, source = base_model(cfg)
    base = hub_id or source
    note = "" if hub_id else "  # the base model's folder on the training machine" + (
        f" (model.pretrained={cfg.model.pretrained})" if source != cfg.model.pretrained else "")
    lines = ["from diffusers import DiffusionPipeline", "", f"base = {base!r}{note}",
             f"run = {str(out)!r}  # this folder (or its hub repo id, once uploaded)"]
    lora = [p for p in exported if p.endswith(".safetensors")]
    if lora:
        lines += ["pipe = DiffusionPipeline.from_pretrained(base)", "pipe.load_lora_weights(run)"]
    else:
        folder = Path(exported[0]) if exported else out / "unet"
        config = folder / "config.json"
        cls = json.loads(config.read_text()).get("_class_name", "UNet2DConditionModel") if config.is_file() else \
            "UNet2DConditionModel"
        lines[0] = f"from diffusers import DiffusionPipeline, {cls}"
        lines += [f"{folder.name} = {cls}.from_pretrained(run, subfolder={folder.name!r})",
                  f"pipe = DiffusionPipeline.from_pretrained(base, {folder.name}={folder.name})"]
    return "\n".join(lines)


def data_lines(cfg: Config, facts: RunFacts) -> list[str]:
    """The data section: rows (or pairs) trained on, liked and disliked, bad rows skipped."""
    d = facts.data
    lines = [f"- source: `{cfg.data.path}`" + (" (streamed from shards)" if cfg.data.streaming else "")]
    if d is not None and d.pairs is not None:
        lines.append(f"- {d.pairs} preference pairs: {d.n_desirable} preferred and {d.n_undesirable} rejected images")
    elif d is not None:
        lines.append(f"- {d.n} rows: {d.n_desirable} liked, {d.n_undesirable} disliked")
    elif facts.rows is not None:
        lines.append(f"- {sum(facts.rows)} rows passed in: {facts.rows[0]} liked, {facts.rows[1]} disliked")
    if d is not None:
        reasons = ", ".join(f"{n} {why}" for why, n in d.skipped.items())
        lines.append(f"- bad rows skipped (`data.on_bad_row={cfg.data.on_bad_row}`): {d.n_skipped}"
                     + (f" ({reasons}; listed in `skipped_rows.jsonl`)" if d.n_skipped else ""))
        lines += [f"- dropped: {n} ({why})" for why, n in d.dropped.items()]
    if facts.stream_skipped is not None:
        lines.append(f"- bad rows skipped while streaming: {facts.stream_skipped} (each time a reader met one)")
    return lines


def render(cfg: Config, out: Path, facts: RunFacts, eval_section: str = NO_EVAL) -> str:
    """The whole card: front matter, then method, data, evaluation, samples and how to load the weights."""
    lora = cfg.lora.rank > 0
    settings = "\n".join(f"| `{key}` | {_setting(cfg, key)} |" for key in SETTINGS)
    grid = (f"![samples]({facts.grid.relative_to(out).as_posix()})\n\nThe trained model (bottom row) below the "
            "reference it started from (when the run kept one), the same prompts and seeds." if facts.grid else
            "No grid: this run could not sample (no VAE or text encoder loaded, or no prompts known). Draw some with "
            f"`dkto sample --model {cfg.model.pretrained} {'--lora' if lora else '--unet'} {out} --prompt ...`.")
    body = [
        f"# {out.name}: {cfg.loss.name} fine-tune of `{cfg.model.pretrained}`",
        "",
        f"Trained with [diffusion-kto](https://arxiv.org/abs/2404.04465) (`loss.name={cfg.loss.name}`), "
        f"{'LoRA adapters' if lora else 'every UNet weight'}, {facts.steps} optimizer steps on {facts.processes} "
        f"process(es){f'; {facts.skipped_steps} non-finite steps skipped' if facts.skipped_steps else ''}.",
        "", "## Method and settings", "", "| setting | value |", "|---|---|", settings, "",
        "The whole resolved config is `config.yaml`; per-step metrics are `metrics.jsonl`.",
        "", "## Data", "", *data_lines(cfg, facts),
        "", "## Evaluation", "", EVAL_START, eval_section.strip(), EVAL_END,
        "", "## Samples", "", grid,
        "", "## Use with diffusers", "", "```python", loading_code(cfg, out, facts.exported), "```", "",
    ]
    meta = yaml.safe_dump(front_matter(cfg, lora), sort_keys=False, allow_unicode=True)
    return f"---\n{meta}---\n\n" + "\n".join(body)


def write_model_card(out: Path, cfg: Config, facts: RunFacts) -> Path:
    """Write ``out/README.md``, keeping the evaluation section of a card already there (a resumed run)."""
    path = Path(out) / CARD
    path.write_text(render(cfg, Path(out), facts, eval_section(path) or NO_EVAL), encoding="utf-8")
    return path


def eval_section(card: Path) -> str | None:
    """The evaluation section of an existing card, None when there is no card with the markers."""
    try:
        text = card.read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(re.escape(EVAL_START) + r"\n(.*?)\n" + re.escape(EVAL_END), text, re.S)
    return match.group(1) if match else None


def add_eval_results(run: str | Path, title: str, markdown: str) -> Path | None:
    """Put an evaluation's results (a markdown block under ``### title``) into a run's card, replacing an earlier
    block of the same title; None when the folder holds no card written by a run."""
    card = Path(run) / CARD
    section = eval_section(card)
    if section is None:
        return None
    blocks = [b for b in re.split(r"(?m)^(?=### )", "" if section.strip() == NO_EVAL else section) if b.strip()]
    blocks = [b for b in blocks if not b.startswith(f"### {title}\n")] + [f"### {title}\n\n{markdown.strip()}\n"]
    text = card.read_text(encoding="utf-8")
    start, end = text.index(EVAL_START) + len(EVAL_START), text.index(EVAL_END)
    card.write_text(text[:start] + "\n" + "\n".join(b.strip() + "\n" for b in blocks) + text[end:], encoding="utf-8")
    return card
