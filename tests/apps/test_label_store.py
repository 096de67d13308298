"""The label store (SQLite, one event per label, undo as an event) and the export's disagreement rule."""
import json
import sqlite3

import pytest

from label_helpers import make_queue

from diffusion_kto.apps.label.export import export_labels, feedback_rows, resolve
from diffusion_kto.apps.label.store import SCHEMA_VERSION, LabelError, LabelStore
from diffusion_kto.data import read_feedback


@pytest.fixture
def store(tmp_path):
    s = LabelStore(make_queue(tmp_path / "q", n=4))
    s.sync_queue()
    yield s
    s.close()


def test_database_is_wal_versioned_and_every_label_and_undo_is_an_event(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.label("000000", "alice", "like")
    store.label("000001", "alice", "dislike")
    store.undo("alice")
    rows = store.db.execute("SELECT item, rater, kind, undoes, at FROM events ORDER BY seq").fetchall()
    assert [r[:4] for r in rows] == [("000000", "alice", "like", None), ("000001", "alice", "dislike", None),
                                     ("000001", "alice", "undo", 2)]
    assert all(r[4].endswith("+00:00") for r in rows)  # UTC times
    assert store.current() == {("000000", "alice"): "like"}


def test_next_never_repeats_for_a_rater_spreads_raters_and_returns_the_undone_image(store):
    seen = []
    while (item := store.next_item("alice")) is not None:
        seen.append(item.id)
        store.label(item.id, "alice", "skip" if len(seen) == 2 else "like")
    assert seen == ["000000", "000001", "000002", "000003"]
    assert store.next_item("bob").id == "000000"  # bob may label what alice labelled
    store.label("000000", "bob", "dislike")
    assert store.undo("alice").id == "000003"
    assert store.next_item("alice").id == "000003"  # the undone image comes back first
    store.label("000003", "alice", "dislike")
    assert store.next_item("alice") is None
    stats = store.stats()
    assert stats["images"] == 4 and stats["labelled"] == 4 and stats["events"] == 7
    assert stats["raters"]["alice"] == {"like": 2, "dislike": 1, "skip": 1, "total": 4}
    assert stats["raters"]["bob"] == {"like": 0, "dislike": 1, "skip": 0, "total": 1}


@pytest.mark.parametrize("call, message, status", [
    (lambda s: s.label("999999", "alice", "like"), "no image '999999'", 404),
    (lambda s: s.label("000000", "alice", "love"), "'love' is not one of like, dislike, skip", 400),
    (lambda s: s.label("000000", "", "like"), "rater: give a non-empty name", 400),
    (lambda s: s.label(7, "alice", "like"), "id: give the id of an image as a string", 400),
    (lambda s: s.undo("nobody"), "has no label to undo", 409),
])
def test_bad_requests_are_refused_with_a_message_and_nothing_is_written(store, call, message, status):
    with pytest.raises(LabelError, match=message) as info:
        call(store)
    assert info.value.status == status
    assert store.stats()["events"] == 0


def test_a_newer_schema_is_refused(tmp_path):
    folder = make_queue(tmp_path / "q", n=1)
    LabelStore(folder).close()
    db = sqlite3.connect(folder / "labels.sqlite")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(LabelError, match="schema version 99"):
        LabelStore(folder)


@pytest.mark.parametrize("likes, dislikes, majority, unanimous, any_like", [
    (0, 0, None, None, None), (1, 0, True, True, True), (0, 1, False, False, False), (1, 1, None, None, True),
    (2, 1, True, None, True), (1, 2, False, None, True), (2, 2, None, None, True),
])
def test_disagreement_rule(likes, dislikes, majority, unanimous, any_like):
    assert resolve(likes, dislikes, "majority") is majority
    assert resolve(likes, dislikes, "unanimous") is unanimous
    assert resolve(likes, dislikes, "any-like") is any_like


def test_export_writes_feedback_the_trainer_reads_without_skips_or_ties(tmp_path):
    folder = make_queue(tmp_path / "q", n=4)
    store = LabelStore(folder)
    store.sync_queue()
    for rater, labels in {"a": ["like", "like", "skip", "like"], "b": ["like", "dislike", "skip", "dislike"],
                          "c": ["dislike", "dislike", "skip", None]}.items():
        for i, label in enumerate(labels):
            if label:
                store.label(f"{i:06d}", rater, label)
    store.close()
    out = tmp_path / "data" / "feedback.jsonl"
    counts = export_labels(folder, out)
    assert counts == {"rows": 2, "liked": 1, "disliked": 1, "only skipped": 1, "disagreement": 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["label"], r["likes"], r["dislikes"], r["raters"]) for r in rows] == [
        ("000000", True, 2, 1, 3), ("000001", False, 1, 2, 3)]
    read = read_feedback(out)  # the trainer's reader: images resolve relative to the file
    assert [r.desirable for r in read] == [True, False] and [r.prompt for r in read] == ["a red circle", "a blue square"]
    with pytest.raises(FileExistsError):
        export_labels(folder, out)
    assert feedback_rows(folder, out, "unanimous")[1] == {"disagreement": 3, "only skipped": 1}
