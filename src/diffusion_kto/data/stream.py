"""Streaming feedback: train from shards too large for disk or memory, the γ-sampler approximated by class buffers.

The in-memory `DesirableSampler` (paper §4.2) draws a liked row with probability γ, uniformly among all liked rows.
A stream cannot index all rows, so each reader keeps one bounded buffer per class (``data.stream_buffer`` rows):

* whether draw k is liked comes from the sampler's own counter-based stream (seed, k), so the class of every draw,
  and hence the liked share, is exactly that of an in-memory run;
* the row is then taken uniformly from that class's buffer and removed; before a take the buffer is refilled to
  capacity from the reader's shards (an epoch boundary ends a refill early once the buffer holds a row);
* rows of the other class read meanwhile join their own buffer, replacing a random row once it is full, so the
  over-represented class is subsampled the way uniform draws with replacement would subsample it;
* buffer slots and replacements are chosen by a generator keyed by (seed, k), so a stream is deterministic.

Readers: with W = world_size · num_workers, reader g = rank · num_workers + worker reads the shards
``order[g::W]`` where ``order`` is a permutation of the shards keyed by (seed, epoch); so no row is read twice in an
epoch and every epoch visits the shards in a new order. Reader g yields the micro-steps s ≡ start_step + worker
(mod num_workers) of its rank (the DataLoader takes batches from its workers in turn), draw ids
k = s·G + rank·B + j as in `DesirableSampler`.

Resume: every item carries its reader's cursor (epoch, shard position, rows read of that shard); the trainer
keeps the cursor of the last batch it used from each reader and stores them in the checkpoint. A resumed reader
starts at its cursor with empty buffers: the rows that sat in the buffers are skipped for that epoch, and which row
of a class each later draw takes differs from an uninterrupted run (the classes do not). See docs/data.md.
"""
from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import numpy as np
import torch.utils.data

from .bad_rows import BadRow
from .dataset import Batch, ItemTransform, collate
from .feedback import image_problem
from .rows import FeedbackError, FeedbackRow
from .sampler import BLOCK, liked_draws
from .shards import shard_entries

logger = logging.getLogger(__name__)

_DRAW_TAG = 0x6B746F_5303  # the stream's per-draw choices (buffer slot, replacements)
_ORDER_TAG = 0x6B746F_5304  # the shard order of each epoch


@dataclass(frozen=True)
class Cursor:
    """Where a reader stands: the epoch, the position in its shard list of that epoch, the rows read of that shard."""

    epoch: int = 0
    shard: int = 0
    row: int = 0


def _generator(seed: int, tag: int, counter: int) -> np.random.Generator:
    """A generator determined only by (seed, tag, counter)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) % 2**64, tag, int(counter)])))


def reader_shards(shards: Sequence[Path], seed: int, epoch: int, reader: int, readers: int) -> list[Path]:
    """The shards reader `reader` of `readers` reads in `epoch`: every readers-th of a (seed, epoch) permutation."""
    order = _generator(seed, _ORDER_TAG, epoch).permutation(len(shards))
    return [shards[i] for i in order[reader::readers]]


def check_readers(n_shards: int, readers: int, source: str) -> None:
    """Refuse more readers (processes × DataLoader workers) than shards: some would have nothing to read."""
    if n_shards < readers:
        raise FeedbackError(
            f"{source}: {n_shards} shard(s) for {readers} readers (processes x data.num_workers); every reader needs "
            "at least one shard: write more, smaller shards (dkto convert shards --rows-per-shard) or use fewer workers"
        )


def read_stream(shards: Sequence[Path], columns: tuple[str, str, str], *, seed: int, reader: int, readers: int,
                start: Cursor = Cursor(), skip_bad: bool = False, skipped: Counter | None = None
                ) -> Iterator[tuple[FeedbackRow, Cursor]]:
    """One reader's rows, epoch after epoch without end, from `start`; each with the cursor just after it.

    A bad row (a broken sample, an unknown label, an empty prompt, with `skip_bad` also an image that does not decode)
    stops the stream with its FeedbackError naming shard and row; with `skip_bad` (data.on_bad_row=skip) it is logged,
    counted by reason in `skipped` (each time a reader meets it: once per epoch) and passed over."""
    cursor, skipped = start, Counter() if skipped is None else skipped
    while True:
        mine = reader_shards(shards, seed, cursor.epoch, reader, readers)
        empty = True
        for position in range(cursor.shard, len(mine)):
            skip = cursor.row if position == cursor.shard else 0
            for n, entry in enumerate(shard_entries(mine[position], columns, skip), start=skip + 1):
                if skip_bad and isinstance(entry, FeedbackRow):
                    entry = image_problem(entry) or entry
                if isinstance(entry, BadRow):
                    _skip(entry, skip_bad, skipped)
                    continue
                empty = False
                yield entry, Cursor(cursor.epoch, position, n)
        if empty and cursor == Cursor(cursor.epoch):
            bad = f" ({sum(skipped.values())} bad rows skipped)" if skipped else ""
            raise FeedbackError(f"{', '.join(map(str, mine))}: no feedback rows in these shards (reader {reader}){bad}")
        cursor = Cursor(cursor.epoch + 1)


def _skip(bad: BadRow, skip_bad: bool, skipped: Counter) -> None:
    """Count and log a bad row met by a reader (data.on_bad_row=skip), or raise it as a FeedbackError."""
    if not skip_bad:
        raise FeedbackError(str(bad))
    skipped[bad.reason] += 1
    logger.warning("data.on_bad_row=skip: skipped %s", bad)


class ClassBuffers:
    """One bounded buffer of rows per class (liked, disliked), filled from one reader's stream."""

    def __init__(self, stream: Iterator[tuple[FeedbackRow, Cursor]], capacity: int, *, start: Cursor = Cursor(),
                 source: str = "the shards"):
        """Empty buffers of `capacity` rows each over `stream`, which starts at `start`."""
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.stream, self.capacity, self.cursor, self.source = stream, int(capacity), start, source
        self.buffers: dict[bool, list[FeedbackRow]] = {True: [], False: []}

    def take(self, liked: bool, rng: np.random.Generator) -> FeedbackRow:
        """A row of the class, uniform over its buffer (refilled first), removed from the buffer."""
        self._fill(liked, rng)
        buffer = self.buffers[liked]
        slot = int(rng.integers(len(buffer)))
        buffer[slot], buffer[-1] = buffer[-1], buffer[slot]
        return buffer.pop()

    def _fill(self, liked: bool, rng: np.random.Generator) -> None:
        """Read until the class's buffer is full, or past an epoch boundary once it holds a row."""
        buffer, first_epoch = self.buffers[liked], self.cursor.epoch
        while len(buffer) < self.capacity and not (buffer and self.cursor.epoch > first_epoch):
            if self.cursor.epoch > first_epoch + 1:
                kind = "liked" if liked else "disliked"
                raise FeedbackError(
                    f"{self.source}: no {kind} rows in a whole epoch of this reader's shards (epoch "
                    f"{self.cursor.epoch - 1}), but data.desirable_ratio draws {kind} rows"
                )
            row, self.cursor = next(self.stream)
            self._add(row, rng)

    def _add(self, row: FeedbackRow, rng: np.random.Generator) -> None:
        """Put a row into its class's buffer, replacing a random row when the buffer is full."""
        buffer = self.buffers[row.desirable]
        if len(buffer) < self.capacity:
            buffer.append(row)
        else:
            buffer[int(rng.integers(self.capacity))] = row


def start_cursor(state: dict | None, reader: int, readers: int) -> Cursor:
    """Where a reader resumes: its recorded cursor, or (reader layout changed) the start of the earliest epoch."""
    if not state or not state.get("cursors"):
        return Cursor()
    cursors = state["cursors"]
    if state.get("readers") == readers:
        return Cursor(*cursors.get(str(reader), ()))
    return Cursor(min(int(c[0]) for c in cursors.values()))


def start_skipped(state: dict | None, reader: int, readers: int) -> int:
    """The bad rows a resumed reader had skipped (0 when the reader layout changed or nothing was recorded)."""
    if not state or state.get("readers") != readers:
        return 0
    return int(state.get("skipped", {}).get(str(reader), 0))


class StreamingFeedbackDataset(torch.utils.data.IterableDataset):
    """Endless training items from shards, liked with probability γ: this rank's micro-batches, one after another."""

    def __init__(
        self,
        shards: Sequence[Path],
        *,
        desirable_ratio: float,
        buffer_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        resume: dict | None = None,
        columns: tuple[str, str, str] = ("image", "prompt", "label"),
        source: str = "",
        skip_bad: bool = False,
        **transform,
    ):
        """Keep the shard list, the draw layout (as `DesirableSampler`), the resume state, whether bad rows are
        skipped (data.on_bad_row=skip, see `read_stream`) and the transform."""
        super().__init__()
        if not shards:
            raise FeedbackError(f"{source or 'data.path'}: no shards")
        if not 0.0 <= desirable_ratio <= 1.0:
            raise ValueError(f"desirable_ratio must be in [0, 1], got {desirable_ratio}")
        if buffer_size < 1 or batch_size < 1 or start_step < 0 or not 0 <= rank < world_size:
            raise ValueError(f"invalid stream layout: buffer_size={buffer_size}, batch_size={batch_size}, "
                             f"start_step={start_step}, rank={rank}, world_size={world_size}")
        self.shards, self.columns = list(shards), columns
        self.source = source or str(self.shards[0].parent)
        self.desirable_ratio, self.buffer_size = float(desirable_ratio), int(buffer_size)
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), int(rank), int(world_size)
        self.start_step, self.resume, self.skip_bad = int(start_step), resume, bool(skip_bad)
        self.transform = ItemTransform(seed=self.seed, **transform)  # crops, flips, dropout keyed by (seed, k) too

    def __iter__(self) -> Iterator[dict]:
        """This reader's items: batch_size per micro-step, for the micro-steps of this DataLoader worker."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader, readers = self.rank * workers + worker, self.world_size * workers
        check_readers(len(self.shards), readers, self.source)
        start = start_cursor(self.resume, reader, readers)
        skipped = Counter({"before": start_skipped(self.resume, reader, readers)})
        stream = read_stream(self.shards, self.columns, seed=self.seed, reader=reader, readers=readers, start=start,
                             skip_bad=self.skip_bad, skipped=skipped)
        buffers = ClassBuffers(stream, self.buffer_size, start=start, source=f"{self.source} (reader {reader})")
        liked: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=bool))
        global_batch = self.batch_size * self.world_size
        for step in itertools.count(self.start_step + worker, workers):
            first = step * global_batch + self.rank * self.batch_size
            for k in range(first, first + self.batch_size):
                if liked[0] != k // BLOCK:
                    liked = (k // BLOCK, liked_draws(self.seed, k // BLOCK, self.desirable_ratio))
                row = buffers.take(bool(liked[1][k % BLOCK]), _generator(self.seed, _DRAW_TAG, k))
                yield {**self.transform(row, -1, k),
                       "stream": (reader, readers, *astuple(buffers.cursor), sum(skipped.values()))}


def collate_stream(batch: Sequence[dict]) -> Batch:
    """`collate`, plus ``stream``: (reader, readers, epoch, shard, row, skipped), the cursor of the reader after this
    batch and the bad rows it has skipped so far."""
    return replace(collate(batch), stream=tuple(batch[-1]["stream"]))
