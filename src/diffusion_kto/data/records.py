"""Raw records of every source format: one reader stack for feedback, conversions and shards.

A source is a local file (.jsonl / .ndjson / .csv / .tsv / .parquet), a local folder, or a Hugging Face hub
dataset id; `locate` is the one rule that tells them apart. Reading it gives `Record`s (a dict of column values
and a `where`: ``file.jsonl:3`` with the 1-based line for text files, ``file.parquet[0]`` / ``owner/name[0]``
with the 0-based row otherwise) or, for a row that cannot be parsed at all, `BadRow`s. A problem with the source
itself (missing, unreadable, missing column) is a `FeedbackError`; a missing optional package (pyarrow,
datasets) is a `MissingExtraError` naming the ``[data]`` extra. What the values mean is for the caller
(rows.make_row for feedback, convert.py for Pick-a-Pic and pairs).
"""
from __future__ import annotations

import csv
import importlib
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .bad_rows import BadRow
from .rows import Entry, FeedbackError, MissingExtraError, RowError, first_line, make_row

INSTALL_HINT = "pip install diffusion-kto[data]"
FILE_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv", ".parquet")
FEEDBACK_FILE = "feedback.jsonl"  # what `dkto demo` and `dkto convert` write
METADATA_FILES = ("metadata.jsonl", "metadata.csv", FEEDBACK_FILE)  # an image folder's feedback, first found wins
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk
DATASETS_PURPOSE = "reading Hugging Face datasets (save_to_disk folders, hub ids)"
_DELIMITERS = {".csv": ",", ".tsv": "\t"}  # text table suffix -> field delimiter
_PACKAGES = {"pyarrow.parquet": "pyarrow", "datasets": "`datasets`"}  # module -> what the error calls it
_HUB_ID = re.compile(r"(\w[\w.-]*/)?\w[\w.-]*")  # `name` or `owner/name`, the shape of a hub repo id
_PARQUET_BATCH = 64  # rows per parquet batch: Pick-a-Pic rows carry two ~0.5 MB JPEGs
_DATASET_BATCH = 1000  # rows per datasets batch


@dataclass(frozen=True)
class Record:
    """One raw row of a source: where it is, its values, and the folder relative image paths resolve against."""

    where: str  # "file.jsonl:3" (1-based line) or "file.parquet[0]" / "owner/name[0]" (0-based row)
    fields: dict[str, Any]  # column -> value; every required column is present, optional ones may be absent
    base: Path | None  # the source file's folder; None for datasets and hub rows


@dataclass(frozen=True)
class Columns:
    """The columns a reader needs, those it keeps when present, and the options naming the needed ones."""

    names: tuple[str, ...]  # required, e.g. ("image", "prompt", "label")
    optional: tuple[str, ...] = ()  # read when present, e.g. Pick-a-Pic's ("has_label",)
    options: tuple[str, ...] | None = None  # e.g. rows.FEEDBACK_OPTIONS: a missing-column error says which to set

    @property
    def wanted(self) -> list[str]:
        """The required then the optional columns, each once."""
        return list(dict.fromkeys((*self.names, *self.optional)))


def optional_module(name: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise the one MissingExtraError: "<purpose> needs <package>: pip install
    diffusion-kto[data]"."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingExtraError(f"{purpose} needs {_PACKAGES.get(name, name)}: {INSTALL_HINT}") from None


# ---------------------------------------------------------------------------------------------- columns and keys


def require_columns(present: Iterable[str], columns: Columns, where: str) -> None:
    """Raise a FeedbackError naming the first missing required column and the columns present (and the option
    that picks another column, when `columns` names them)."""
    present = list(present)
    for index, name in enumerate(columns.names):
        if name not in present:
            listed = ", ".join(repr(p) for p in present) or "none"
            message = f"{where}: no column '{name}' (columns present: {listed})"
            if columns.options:
                option = columns.options[index]
                message += f"; pick the right one with {option}= (data.{option} in the config)"
            raise FeedbackError(message)


def missing_key(record: dict, keys: Sequence[str]) -> str | None:
    """The message for the first of `keys` that a JSON record lacks, listing the keys it has; None if all present."""
    for key in keys:
        if key not in record:
            present = ", ".join(repr(k) for k in record) or "none"
            return f"missing key '{key}' (keys present: {present})"
    return None


# ---------------------------------------------------------------------------------------------- text files


def read_bytes(path: Path, name: str) -> bytes:
    """The bytes of a data file, as a FeedbackError when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise FeedbackError(f"{name}: cannot read ({err.strerror or err})") from None


def _decode(data: bytes, name: str) -> str:
    """UTF-8 text of a whole file (a BOM is dropped); a decoding error names the line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise FeedbackError(f"{name}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _decode_line(raw: bytes, where: str, first: bool) -> str:
    """One line of a JSON-lines file as text (a BOM on the first line and a trailing CR dropped)."""
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8").removesuffix("\r")
    except UnicodeDecodeError as err:
        raise RowError(where, "malformed row", f"not valid UTF-8 ({err.reason} at column {err.start + 1})") from None


def _json_object(line: str, where: str) -> dict:
    """One line of a JSON-lines file parsed as a JSON object."""
    try:
        record = json.loads(line)
    except RecursionError:
        raise RowError(where, "malformed row", "malformed JSON (nested too deeply)") from None
    except ValueError as err:
        raise RowError(where, "malformed row", f"malformed JSON ({first_line(err)})") from None
    if not isinstance(record, dict):
        raise RowError(where, "malformed row", f"expected a JSON object {{...}}, got {type(record).__name__}")
    return record


def _json_lines(path: Path, name: str) -> Iterator[tuple[str, dict] | BadRow]:
    """(where, object), or the BadRow, of each non-blank line of a JSON-lines file; `where` is name:line (1-based)."""
    for number, raw in enumerate(read_bytes(path, name).split(b"\n"), start=1):
        where = f"{name}:{number}"
        try:
            line = _decode_line(raw, where, first=number == 1)
            if line.strip():
                yield where, _json_object(line, where)
        except RowError as err:
            yield err.bad_row


def jsonl_records(path: Path, name: str, columns: Columns, base: Path | None) -> Iterator[Record | BadRow]:
    """Records of a JSON-lines file (one object per line, blank lines skipped); a line that is not a JSON object
    or lacks a required key is a BadRow."""
    for item in _json_lines(path, name):
        if isinstance(item, BadRow):
            yield item
            continue
        where, record = item
        missing = missing_key(record, columns.names)
        yield BadRow(where, "missing key", missing) if missing else Record(where, record, base)


def csv_records(
    path: Path, name: str, columns: Columns, base: Path | None, delimiter: str = ","
) -> Iterator[Record | BadRow]:
    """Records of a CSV (or TSV) file with a header line; `where` is the record's first physical line (header = 1);
    blank rows are skipped, a row with the wrong number of fields is a BadRow."""
    text = _decode(read_bytes(path, name), name)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            raise FeedbackError(f"{name}: file is empty (expected a header line with {', '.join(columns.names)})")
        require_columns(header, columns, f"{name}:1")
        start = reader.line_num + 1
        for fields in reader:
            where, start = f"{name}:{start}", reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                yield BadRow(where, "malformed row", f"row has {len(fields)} fields but the header has "
                             f"{len(header)} (a prompt with an unquoted comma?)")
                continue
            yield Record(where, dict(zip(header, fields)), base)
    except csv.Error as err:
        raise FeedbackError(f"{name}:{reader.line_num + 1}: malformed CSV ({err})") from None


def column_names(path: Path, name: str) -> set[str]:
    """The keys of the first object of a JSON-lines file, the header of a CSV file, or the columns of a parquet file
    (empty if none)."""
    if path.suffix.lower() == ".parquet":
        pq = optional_module("pyarrow.parquet", "reading parquet")
        try:
            return set(pq.read_schema(path).names)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
            raise FeedbackError(f"{name}: cannot read parquet ({first_line(err)})") from None
    delimiter = _DELIMITERS.get(path.suffix.lower())
    if delimiter:
        text = _decode(read_bytes(path, name), name)
        return set(next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), []))
    return next((set(item[1]) for item in _json_lines(path, name) if not isinstance(item, BadRow)), set())


# ---------------------------------------------------------------------------------------------- parquet


def parquet_records(path: Path, name: str, columns: Columns, base: Path | None) -> Iterator[Record]:
    """Records of a parquet file, read in batches of the wanted columns only (image structs {bytes, path} as
    written by HF datasets are kept as they are)."""
    pq = optional_module("pyarrow.parquet", "reading parquet")
    try:
        handle = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a broken file
        raise FeedbackError(f"{name}: cannot read parquet ({first_line(err)})") from None
    with handle:  # closed when the records are all read (or the generator is dropped)
        present = handle.schema_arrow.names
        require_columns(present, columns, name)
        wanted = [c for c in columns.wanted if c in present]
        index = 0
        for batch in _parquet_batches(handle, wanted, name):
            data = batch.to_pydict()  # column -> list of the batch's values
            for i in range(batch.num_rows):
                yield Record(f"{name}[{index}]", {c: data[c][i] for c in wanted}, base)
                index += 1


def _parquet_batches(handle, wanted: list[str], name: str) -> Iterator:
    """The record batches of an open parquet file; a read error is a FeedbackError naming the file."""
    try:
        yield from handle.iter_batches(batch_size=_PARQUET_BATCH, columns=wanted)
    except Exception as err:
        raise FeedbackError(f"{name}: cannot read parquet ({first_line(err)})") from None


def parquet_files(folder: Path, split: str) -> list[Path]:
    """The .parquet files under a folder (sorted); those named `<split>-*` when any are (the hub's layout)."""
    files = sorted(p for p in folder.rglob("*.parquet") if p.is_file())
    return [p for p in files if p.name.startswith(f"{split}-")] or files


# ---------------------------------------------------------------------------------------------- HF datasets


def saved_dataset_records(folder: Path, name: str, columns: Columns, split: str) -> Iterator[Record]:
    """Records of a folder written by datasets' save_to_disk (the `split` of a DatasetDict)."""
    datasets = optional_module("datasets", DATASETS_PURPOSE)
    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as err:
        raise FeedbackError(f"{name}: cannot load the saved dataset ({first_line(err)})") from None
    if isinstance(dataset, (datasets.DatasetDict, dict)):
        if split not in dataset:
            raise FeedbackError(f"{name}: no split '{split}' (splits: {', '.join(dataset)}); pick one with split=")
        dataset, name = dataset[split], f"{name} ({split})"
    yield from dataset_records(dataset, name, columns)


def hub_records(dataset_id: str, columns: Columns, split: str, streaming: bool = False) -> Iterator[Record]:
    """Records of the `split` of a Hugging Face hub dataset, downloaded or (`streaming`) streamed."""
    datasets = optional_module("datasets", f"'{dataset_id}' is not a local file or folder; {DATASETS_PURPOSE}")
    try:
        dataset = datasets.load_dataset(dataset_id, split=split, **({"streaming": True} if streaming else {}))
    except Exception as err:
        raise FeedbackError(
            f"{dataset_id}: not a local file or folder, and loading it as a hub dataset failed ({first_line(err)})"
        ) from None
    yield from dataset_records(dataset, dataset_id, columns)


def dataset_records(dataset, name: str, columns: Columns) -> Iterator[Record]:
    """Records of a datasets.Dataset or IterableDataset, images kept encoded (Image features are not decoded);
    without known features (some streamed datasets) the columns are checked on the first row."""
    features = dataset.features
    if features:
        require_columns(features, columns, name)
        dataset = _encoded_images(dataset.select_columns([c for c in columns.wanted if c in features]))
    for index, record in enumerate(_dataset_rows(dataset)):
        if index == 0 and not features:
            require_columns(record, columns, name)
        yield Record(f"{name}[{index}]", record, None)


def _encoded_images(dataset):
    """The dataset with every decoding `Image` column cast to decode=False (values stay {bytes, path})."""
    datasets = optional_module("datasets", DATASETS_PURPOSE)
    for column, feature in dataset.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _dataset_rows(dataset) -> Iterator[dict]:
    """The rows of a dataset as dicts, read in batches."""
    for batch in dataset.iter(batch_size=_DATASET_BATCH):  # column -> list of the batch's values
        keys = list(batch)
        for i in range(len(batch[keys[0]]) if keys else 0):
            yield {key: batch[key][i] for key in keys}


# ---------------------------------------------------------------------------------------------- sources


def _expand_home(path: Path) -> Path:
    """`~` expanded where a home directory is known; the path unchanged otherwise."""
    try:
        return path.expanduser()
    except RuntimeError:
        return path


def locate(src: str | Path) -> Path | str:
    """The one rule for a source: an existing local file or folder (`~` expanded) as a Path; else the hub dataset
    id, when `src` has the shape of one (`name` or `owner/name`, no data file suffix); else "no such file"."""
    local = _expand_home(Path(src))
    if local.exists():
        return local
    text = str(src)
    if _HUB_ID.fullmatch(text) and Path(text).suffix.lower() not in FILE_SUFFIXES:
        return text
    raise FeedbackError(f"{text}: no such file or folder")


def find_metadata(folder: Path) -> Path | None:
    """An image folder's feedback file (metadata.jsonl, metadata.csv or feedback.jsonl, in that order), if any."""
    return next((folder / m for m in METADATA_FILES if (folder / m).is_file()), None)


def file_records(path: Path, name: str, columns: Columns, base: Path | None = None) -> Iterator[Record | BadRow]:
    """Records of one data file by its suffix (.jsonl / .ndjson, .csv, .tsv, .parquet); `base`: its folder."""
    base = path.parent if base is None else base
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return jsonl_records(path, name, columns, base)
    if suffix in _DELIMITERS:
        return csv_records(path, name, columns, base, _DELIMITERS[suffix])
    if suffix == ".parquet":
        return parquet_records(path, name, columns, base)
    raise FeedbackError(f"{name}: unsupported file type '{suffix}' (use .jsonl, .csv, .tsv or .parquet)")


def folder_records(folder: Path, name: str, columns: Columns, split: str) -> Iterator[Record | BadRow]:
    """Records of a folder: an image folder (its metadata file, image paths relative to the folder), a
    save_to_disk folder, or a folder of parquet files (those of `split` when named so)."""
    metadata = find_metadata(folder)
    if metadata is not None:
        return file_records(metadata, str(Path(name) / metadata.name), columns, folder)
    if any((folder / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        return saved_dataset_records(folder, name, columns, split)
    files = parquet_files(folder, split)
    if not files:
        raise FeedbackError(
            f"{name}: folder has no metadata.jsonl, metadata.csv or feedback.jsonl, is not a datasets save_to_disk "
            "folder and holds no .parquet files"
        )
    return (r for f in files for r in parquet_records(f, str(Path(name) / f.relative_to(folder)), columns, f.parent))


def source_records(
    src: str | Path, columns: Columns, *, split: str = "train", streaming: bool = False
) -> Iterator[Record | BadRow]:
    """Records of any source: a data file, a folder (see folder_records) or a hub dataset id (`streaming`: read
    as it downloads); `where` starts with `src` as given."""
    located = locate(src)
    if isinstance(located, str):
        return hub_records(located, columns, split, streaming)
    if located.is_dir():
        return folder_records(located, str(src), columns, split)
    return file_records(located, str(src), columns)


def feedback_entries(records: Iterable[Record | BadRow], columns: tuple[str, str, str]) -> Iterator[Entry]:
    """The FeedbackRow (or BadRow) of each record, from its (image, prompt, label) columns."""
    for record in records:
        yield record if isinstance(record, BadRow) else make_row(record.fields, record.where, columns, record.base)
