"""What a run reads before any model loads: its feedback rows (bad rows per data.on_bad_row) or its shards, and
the weight dtype of train.mixed_precision. Shared by the trainer and `dkto cache`."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from ..config import Config, ConfigError
from ..data import BadRow, Screened, read_feedback, screen_feedback
from ..data.bad_rows import SKIPPED_ROWS_FILE, write_skipped_rows
from ..data.feedback import image_problem
from ..data.pairs import load_pairs, pair_format
from ..data.rows import FeedbackError
from ..data.shards import list_shards, shard_entries
from ..objectives import objective_class

log = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_feedback(cfg: Config) -> Screened:
    """Read and validate the feedback rows named by ``data.*`` before any model loads (bad rows: data.on_bad_row);
    a source of preference pairs (data/pairs.py, told by its columns) is read as pairs, for a paired objective."""
    if cfg.data.path is None:
        raise ConfigError("data.path: no feedback data given (a JSONL / CSV / parquet file, an image folder, or a dataset)")
    kind, objective = pair_format(cfg.data.path, cfg.data.prompt_column), objective_class(cfg.loss.name)
    if kind is not None:
        if not objective.paired:
            raise FeedbackError(
                f"{cfg.data.path}: holds preference pairs ({kind} columns), but loss.name={cfg.loss.name} trains on "
                "per-image likes and dislikes: train them with loss.name=dpo, or make per-image feedback first "
                "(dkto convert pairs, or dkto convert pickapic)")
        return load_pairs(cfg.data.path, prompt_column=cfg.data.prompt_column, skip=cfg.data.on_bad_row == "skip")
    bad_rows: list[BadRow] = []
    rows = read_feedback(
        cfg.data.path,
        image_column=cfg.data.image_column,
        prompt_column=cfg.data.prompt_column,
        label_column=cfg.data.label_column,
        bad_rows=bad_rows,
    )
    return screen_feedback(rows, bad_rows, skip=cfg.data.on_bad_row == "skip",
                           need_both_classes=objective.needs_both(cfg.data.desirable_ratio),
                           objective=cfg.loss.name, one_class_setting=objective.one_class_setting)


def write_data_report(cfg: Config, screened: Screened, out: Path, overlong_prompts: int = 0) -> None:
    """Record what the run trains on in ``data_summary.json``; with data.on_bad_row=skip, list skipped rows too."""
    report = {"path": cfg.data.path, "on_bad_row": cfg.data.on_bad_row, **dataclasses.asdict(screened.summary),
              "truncated_prompts": overlong_prompts}
    if cfg.data.on_bad_row == "skip":
        report["skipped_rows_file"] = str(write_skipped_rows(screened.skipped, out / SKIPPED_ROWS_FILE))
        if screened.skipped:
            log.warning("the %d skipped rows are listed in %s", len(screened.skipped), report["skipped_rows_file"])
    (out / "data_summary.json").write_text(json.dumps(report, indent=1) + "\n")


def open_stream(cfg: Config) -> list[Path]:
    """The shards named by ``data.path`` (data.streaming), their first row read and its image checked (with
    data.on_bad_row=skip: the first good row of the first shard)."""
    if cfg.data.path is None:
        raise ConfigError("data.path: no shards given (a folder of .tar / .parquet shards, a glob, or train-{000..009}.tar)")
    shards = list_shards(cfg.data.path)
    columns = (cfg.data.image_column, cfg.data.prompt_column, cfg.data.label_column)
    bad = None
    for entry in shard_entries(shards[0], columns):
        bad = entry if isinstance(entry, BadRow) else image_problem(entry)
        if bad is None:
            return shards
        if cfg.data.on_bad_row != "skip":
            raise FeedbackError(str(bad))
    if bad is None:
        raise FeedbackError(f"{shards[0]}: shard holds no feedback rows")
    return shards  # data.on_bad_row=skip and every row of the first shard is bad: the readers look further
