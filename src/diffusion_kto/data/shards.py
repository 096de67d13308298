"""Feedback shards: webdataset-style tar files (or parquet files) that training can stream without holding them.

A tar shard holds one sample per key, its members next to each other: ``{key}.png`` (or .jpg, .jpeg, .webp, .gif)
with the encoded image and ``{key}.json`` with the feedback row's other fields, ``{"prompt": ..., "label": ...}``
(the column names of ``data.prompt_column`` / ``data.label_column``; labels as anywhere else). As in webdataset,
the key is the member path up to the first dot of its file name. A parquet shard holds the usual image, prompt and
label columns. Every problem names the shard and the key (tar) or the 0-based row (parquet): a problem of one sample
is a `BadRow` (`shard_entries`; `data.on_bad_row=skip` passes over it while streaming) or, read with `read_shard`, a
`FeedbackError`; a shard that cannot be read at all is always a `FeedbackError`.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .output import image_suffix, prepare_out_dir
from .records import Columns, feedback_entries, missing_key, parquet_records
from .bad_rows import BadRow
from .rows import FEEDBACK_OPTIONS, Entry, FeedbackError, FeedbackRow, first_line, make_row, or_raise

SHARD_SUFFIXES = (".tar", ".parquet")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif", "img")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


# ---------------------------------------------------------------------------------------------- finding shards


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset ranges: ``train-{000..002}.tar`` -> train-000.tar, train-001.tar, train-002.tar."""
    match = _RANGE.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    if int(last) < int(first):
        raise FeedbackError(f"{pattern}: range {{{first}..{last}}} counts down")
    width = len(first) if first.startswith("0") or len(first) == len(last) else 0
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [p for i in range(int(first), int(last) + 1) for p in expand_braces(f"{head}{i:0{width}d}{tail}")]


def list_shards(pattern: str | Path) -> list[Path]:
    """The shard files named by a folder (its .tar / .parquet files), a brace range, a glob, or one file."""
    text = str(pattern)
    folder = Path(text).expanduser()
    if folder.is_dir():
        shards = sorted(p for p in folder.iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file())
        if not shards:
            raise FeedbackError(f"{text}: folder holds no .tar or .parquet shards")
        return shards
    shards = []
    for name in expand_braces(text):
        matches = sorted(glob.glob(str(Path(name).expanduser()))) if glob.has_magic(name) else [name]
        if not matches:
            raise FeedbackError(f"{name}: no shard matches this pattern")
        shards.extend(Path(m) for m in matches)
    for shard in shards:
        if not shard.is_file():
            raise FeedbackError(f"{shard}: no such shard file")
        if shard.suffix not in SHARD_SUFFIXES:
            raise FeedbackError(f"{shard}: unsupported shard type '{shard.suffix}' (use .tar or .parquet)")
    return list(dict.fromkeys(shards))


# ---------------------------------------------------------------------------------------------- reading


def read_shard(path: Path, columns: tuple[str, str, str], skip: int = 0) -> Iterator[FeedbackRow]:
    """The feedback rows of one shard in order, after the first `skip`; a bad sample stops it with its error."""
    return map(or_raise, shard_entries(path, columns, skip))


def shard_entries(path: Path, columns: tuple[str, str, str], skip: int = 0) -> Iterator[Entry]:
    """The feedback row, or the BadRow saying what is wrong with it, of every sample of one shard in order, after the
    first `skip` (skipped tar samples are not read). A shard that cannot be read at all is a FeedbackError."""
    if path.suffix == ".parquet":
        records = parquet_records(path, str(path), Columns(columns, options=FEEDBACK_OPTIONS), path.parent)
        yield from feedback_entries(itertools.islice(records, skip, None), columns)
        return
    for index, (key, members) in enumerate(_tar_samples(path)):
        if index >= skip:
            yield _tar_row(path, key, {ext: read() for ext, read in members.items()}, columns)


def _tar_samples(path: Path) -> Iterator[tuple[str, dict]]:
    """(key, {extension: reader of the member's bytes}) per sample of a tar shard, members grouped by key."""
    try:
        with tarfile.open(path, "r:*") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                directory, _, name = info.name.rpartition("/")
                stem, dot, extension = name.partition(".")
                if not dot:
                    continue  # a member without an extension belongs to no sample field
                member_key = f"{directory}/{stem}" if directory else stem
                if member_key != key and key is not None:
                    yield key, members
                    members = {}
                key = member_key
                members[extension.lower()] = lambda info=info: tar.extractfile(info).read()
            if key is not None:
                yield key, members
    except (tarfile.TarError, OSError, EOFError) as err:
        raise FeedbackError(f"{path}: cannot read tar shard ({first_line(err)})") from None


def _tar_row(path: Path, key: str, members: dict[str, bytes], columns: tuple[str, str, str]) -> Entry:
    """The feedback row of one tar sample (the image member plus the prompt and label from its .json member), or the
    BadRow saying what is wrong with it."""
    image_column, prompt_column, label_column = columns
    where = f"{path}:{key}"
    listed = ", ".join(f"{key}.{ext}" for ext in members)
    images = [ext for ext in IMAGE_EXTENSIONS if ext in members]
    if not images:
        return BadRow(where, "missing image", f"no image member ({key}.png, .jpg, ...); members: {listed}")
    if "json" not in members:
        return BadRow(where, "malformed row", f"no {key}.json member with the prompt and label; members: {listed}")
    try:
        record = json.loads(members["json"].decode("utf-8"))
    except (ValueError, RecursionError) as err:
        return BadRow(where, "malformed row", f"{key}.json is not valid JSON ({first_line(err)})")
    if not isinstance(record, dict):
        return BadRow(where, "malformed row", f"{key}.json must hold an object {{...}}, got {type(record).__name__}")
    missing = missing_key(record, (prompt_column, label_column))
    if missing:
        return BadRow(where, "missing key", f"{key}.json: {missing}")
    return make_row({**record, image_column: members[images[0]]}, where, columns, None)


# ---------------------------------------------------------------------------------------------- writing


def _image_bytes(row: FeedbackRow) -> bytes:
    """The encoded bytes of a row's image (read from its file when it is a path)."""
    if isinstance(row.image, bytes):
        return row.image
    try:
        return row.image.read_bytes()
    except OSError as err:
        raise FeedbackError(f"{row.where}: cannot read image '{row.image}' ({err.strerror or err})") from None


def _write_tar(path: Path, samples: Sequence[tuple[str, FeedbackRow]]) -> None:
    """Write (key, row) samples as one tar shard, through a temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for key, row in samples:
            data = _image_bytes(row)
            fields = json.dumps({"prompt": row.prompt, "label": row.desirable}, ensure_ascii=False).encode("utf-8")
            for name, payload in ((f"{key}{image_suffix(data)}", data), (f"{key}.json", fields)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    tmp.replace(path)


def write_shards(rows: Sequence[FeedbackRow], out_dir: str | Path, rows_per_shard: int = 1000,
                 prefix: str = "train") -> list[Path]:
    """Write feedback rows as tar shards ``{prefix}-000000.tar``, ... in `out_dir` (in row order); return them."""
    if rows_per_shard < 1:
        raise FeedbackError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if not rows:
        raise FeedbackError("no feedback rows to write")
    out = prepare_out_dir(out_dir, with_images=False)
    samples = [(f"{i:09d}", row) for i, row in enumerate(rows)]
    paths = []
    for number, start in enumerate(range(0, len(samples), rows_per_shard)):
        paths.append(out / f"{prefix}-{number:06d}.tar")
        _write_tar(paths[-1], samples[start: start + rows_per_shard])
    return paths


def shard_pattern(paths: Sequence[Path]) -> str:
    """A brace pattern naming written shards, e.g. ``out/train-{000000..000009}.tar`` (what data.path takes)."""
    first, last = paths[0], paths[-1]
    if len(paths) == 1:
        return str(first)
    head, number = first.stem.rsplit("-", 1)
    return str(first.with_name(f"{head}-{{{number}..{last.stem.rsplit('-', 1)[1]}}}{first.suffix}"))
