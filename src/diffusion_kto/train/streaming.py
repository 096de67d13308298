"""Where a streamed run stands (``data.streaming``): each reader's cursor after its last used batch, gathered from
every process into checkpoints, and handed back to the readers on resume (see data/stream.py)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..data import Batch

log = logging.getLogger(__name__)


class StreamPosition:
    """The cursors of this process's stream readers (reader id -> cursor), and the reader count they belong to."""

    def __init__(self) -> None:
        self.cursors: dict[str, list[int]] = {}
        self.skipped: dict[str, int] = {}  # reader id -> bad rows it skipped (data.on_bad_row=skip)
        self.readers: int | None = None

    def note(self, batch: Batch) -> None:
        """Remember where the reader of a streamed batch stood after it, and how many bad rows it had skipped."""
        if batch.stream is not None:
            reader, readers, *cursor, skipped = batch.stream
            self.cursors[str(reader)] = [int(c) for c in cursor]
            self.skipped[str(reader)] = int(skipped)
            self.readers = int(readers)

    def keep(self, state: dict | None, path: Path, *, process: int, processes: int, workers: int) -> None:
        """Start from the resumed cursors of this process's readers, so that a reader that makes no batch before the
        next checkpoint keeps its position there (a warning when the reader layout changed)."""
        _warn_layout(state, processes * workers, path)
        if state and state.get("readers") == processes * workers:
            mine = {str(process * workers + w) for w in range(workers)}
            self.cursors = {k: list(v) for k, v in state["cursors"].items() if k in mine}
            self.skipped = {k: int(v) for k, v in state.get("skipped", {}).items() if k in mine}
            self.readers = state["readers"]

    def state(self) -> dict:
        """The readers' cursors and skipped-row counts of every process (a collective call: every process must make
        it)."""
        from accelerate.utils import gather_object

        cursors: dict[str, list[int]] = {}
        skipped: dict[str, int] = {}
        for part, counts in gather_object([(self.cursors, self.skipped)]):
            cursors.update(part)
            skipped.update(counts)
        return {"readers": self.readers, "cursors": cursors, "skipped": skipped}


def _warn_layout(state: dict | None, readers: int, path: Path) -> None:
    """Say when a resumed stream cannot continue each reader where it stood."""
    if not state or not state.get("cursors"):
        log.warning("%s holds no stream position: the stream starts again from its first rows", path)
    elif state.get("readers") != readers:
        log.warning("%s was written with %s stream readers, now %d (processes x data.num_workers): every reader "
                    "starts at the beginning of the earliest recorded epoch", path, state.get("readers"), readers)
