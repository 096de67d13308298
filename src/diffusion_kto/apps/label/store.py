"""The labels of a labeling queue: an SQLite database in the queue's folder, one event per row.

Every label a person gives (like, dislike, skip) and every undo is one row of ``events``, written in its own
transaction before the server answers, with the rater and the time (UTC). Nothing is updated or deleted, so what a
rater said when is never lost; a rater's current label of an image is their last label event on it that no undo
took back. The database runs in WAL mode with ``synchronous=FULL``: a label acknowledged to the client is on disk,
whatever happens to the server afterwards. The schema version is SQLite's ``user_version``."""
from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ...errors import UserError

DB_NAME = "labels.sqlite"
QUEUE_FILE = "queue.jsonl"
SCHEMA_VERSION = 1
LABELS = ("like", "dislike", "skip")
MAX_RATER = 64  # characters of a rater's name

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,          -- the queue row's id
    image TEXT NOT NULL,          -- path relative to the queue folder
    prompt TEXT NOT NULL,
    position INTEGER NOT NULL     -- order in queue.jsonl
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    item TEXT NOT NULL REFERENCES items(id),
    rater TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('like', 'dislike', 'skip', 'undo')),
    undoes INTEGER REFERENCES events(seq),   -- an undo: the label event it takes back
    at TEXT NOT NULL                          -- ISO 8601, UTC
);
CREATE INDEX IF NOT EXISTS events_by_rater ON events (rater, seq);
CREATE INDEX IF NOT EXISTS events_by_item ON events (item);
"""


class LabelError(UserError):
    """A label request the store refuses (unknown image, unknown label, nothing to undo, ...); ``status`` is the HTTP
    status the server answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Item:
    """One image of the queue."""

    id: str
    image: str  # relative to the queue folder
    prompt: str


def read_queue(folder: Path) -> list[dict]:
    """The rows of ``queue.jsonl`` (written by ``dkto generate``); a torn last line (a killed writer) is ignored."""
    path = Path(folder) / QUEUE_FILE
    if not path.is_file():
        raise LabelError(f"{path}: no labeling queue here; write one with dkto generate --out {folder}")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the last line of an interrupted write
            raise LabelError(f"{path}: line {number} is not JSON") from None
        missing = {"id", "image", "prompt"} - set(row)
        if missing:
            raise LabelError(f"{path}: line {number} lacks {', '.join(sorted(missing))}")
        rows.append(row)
    return rows


def check_rater(rater) -> str:
    """A rater's name: a non-empty string of at most MAX_RATER printable characters (LabelError otherwise)."""
    if not isinstance(rater, str) or not rater.strip():
        raise LabelError("rater: give a non-empty name (e.g. ?rater=alice)")
    rater = rater.strip()
    if len(rater) > MAX_RATER or not rater.isprintable():
        raise LabelError(f"rater: at most {MAX_RATER} printable characters, got {rater[:80]!r}")
    return rater


def _now() -> str:
    """The time of an event: ISO 8601 in UTC with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class LabelStore:
    """Label events of one queue folder (``<folder>/labels.sqlite``); open one per thread."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / DB_NAME
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit transactions
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise LabelError(f"{self.path}: schema version {version}, this dkto reads {SCHEMA_VERSION}")
        if version == 0:  # a new database: the schema and its version in one transaction
            self.db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def transaction(self):
        """A context manager: BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error)."""
        return _Transaction(self.db)

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    def sync_queue(self) -> int:
        """Add the queue's rows that the database lacks (a queue grows while dkto generate runs); their count."""
        rows = read_queue(self.folder)
        with self.transaction():
            before = self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            self.db.executemany("INSERT OR IGNORE INTO items (id, image, prompt, position) VALUES (?, ?, ?, ?)",
                                [(str(r["id"]), str(r["image"]), str(r["prompt"]), i) for i, r in enumerate(rows)])
            return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0] - before

    def item(self, item_id) -> Item:
        """The queue item ``item_id`` (LabelError 404 when there is none)."""
        if not isinstance(item_id, str) or not item_id:
            raise LabelError("id: give the id of an image as a string (from /api/next)")
        row = self.db.execute("SELECT id, image, prompt FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise LabelError(f"id: no image {item_id[:80]!r} in this queue", status=404)
        return Item(*row)

    def _live(self, rater: str | None = None) -> str:
        """SQL of the label events that no undo took back (optionally one rater's)."""
        where = "AND e.rater = ?" if rater is not None else ""
        return ("SELECT e.seq, e.item, e.rater, e.kind FROM events e WHERE e.kind != 'undo' "
                f"AND NOT EXISTS (SELECT 1 FROM events u WHERE u.undoes = e.seq) {where}")

    def current(self) -> dict[tuple[str, str], str]:
        """(item, rater) -> that rater's current label of that image (its last live label event)."""
        rows = self.db.execute(self._live() + " ORDER BY e.seq").fetchall()
        return {(item, rater): kind for _, item, rater, kind in rows}

    def next_item(self, rater: str) -> Item | None:
        """The next image for ``rater``: one they have no live label on, the image of their last undo first, then those
        with the fewest raters so far (spreading raters over the queue), then queue order; None when none is left."""
        rater = check_rater(rater)
        live = f"SELECT item FROM ({self._live(rater)})"
        last = self.db.execute("SELECT kind, item FROM events WHERE rater = ? ORDER BY seq DESC LIMIT 1",
                               (rater,)).fetchone()
        if last and last[0] == "undo" and not self.db.execute(f"{live} WHERE item = ?", (rater, last[1])).fetchone():
            return self.item(last[1])
        row = self.db.execute(
            f"SELECT i.id, i.image, i.prompt FROM items i WHERE i.id NOT IN ({live}) "
            f"ORDER BY (SELECT COUNT(DISTINCT l.rater) FROM ({self._live()}) l WHERE l.item = i.id), i.position "
            "LIMIT 1", (rater,)).fetchone()
        return None if row is None else Item(*row)

    def label(self, item_id, rater, label) -> int:
        """Record one label event in its own transaction; its sequence number. A rater who labels an image again
        changes their label (the newer event wins)."""
        rater = check_rater(rater)
        if label not in LABELS:
            raise LabelError(f"label: {str(label)[:40]!r} is not one of {', '.join(LABELS)}")
        item = self.item(item_id)
        with self.transaction():
            cur = self.db.execute("INSERT INTO events (item, rater, kind, at) VALUES (?, ?, ?, ?)",
                                  (item.id, rater, label, _now()))
            return cur.lastrowid

    def undo(self, rater) -> Item:
        """Take back ``rater``'s latest live label (an undo event); the image it was on. LabelError 409 when none."""
        rater = check_rater(rater)
        with self.transaction():
            row = self.db.execute(self._live(rater) + " ORDER BY e.seq DESC LIMIT 1", (rater,)).fetchone()
            if row is None:
                raise LabelError(f"rater {rater!r} has no label to undo", status=409)
            self.db.execute("INSERT INTO events (item, rater, kind, undoes, at) VALUES (?, ?, 'undo', ?, ?)",
                            (row[1], rater, row[0], _now()))
        return self.item(row[1])

    def stats(self) -> dict:
        """Counts for the page and scripts: images, images labelled by anyone, per-rater current labels, events."""
        current = self.current()
        raters: dict[str, Counter] = {}
        for (_, rater), kind in current.items():
            raters.setdefault(rater, Counter())[kind] += 1
        items = self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        events = self.db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        return {"images": items, "labelled": len({item for item, _ in current}), "events": events,
                "raters": {r: {k: c.get(k, 0) for k in LABELS} | {"total": sum(c.values())}
                           for r, c in sorted(raters.items())}}


class _Transaction:
    """BEGIN IMMEDIATE on enter; COMMIT on a clean exit, ROLLBACK on an exception."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
