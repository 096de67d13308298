"""``dkto label export``: the labels of a queue as feedback rows the trainer reads, raters' disagreements resolved.

A rater's label of an image is their last label that no undo took back (see :mod:`.store`). Skips say nothing about
the image and are left out. Per image, the likes and dislikes of its raters are then resolved by a policy:

* ``majority`` (default): liked when more raters liked it than disliked it, disliked when more disliked it; a tie
  (one like and one dislike, ...) is dropped: the people disagree and neither label is the feedback;
* ``unanimous``: kept only when every rater who liked or disliked it agrees;
* ``any-like``: liked when any rater liked it (generous people's feedback), else disliked.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from .store import LabelError, LabelStore, read_queue

POLICIES = ("majority", "unanimous", "any-like")


def resolve(likes: int, dislikes: int, policy: str = "majority") -> bool | None:
    """The label of an image that ``likes`` raters liked and ``dislikes`` disliked; None: dropped (no rater, a
    tie under majority, a disagreement under unanimous)."""
    if policy not in POLICIES:
        raise LabelError(f"--policy: {policy!r} is not one of {', '.join(POLICIES)}")
    if likes + dislikes == 0:
        return None
    if policy == "any-like":
        return likes > 0
    if policy == "unanimous":
        return None if likes and dislikes else likes > 0
    return None if likes == dislikes else likes > dislikes


def _image_path(folder: Path, image: str, out: Path) -> str:
    """The image's path as the exported file should name it: relative to the file's folder when possible."""
    path = (folder / image).resolve()
    try:
        return os.path.relpath(path, out.resolve().parent)
    except ValueError:  # another drive (Windows)
        return str(path)


def feedback_rows(folder: str | Path, out: str | Path, policy: str = "majority") -> tuple[list[dict], dict]:
    """(rows, counts): one feedback row per image whose labels resolve, in queue order, and what was dropped."""
    folder, out = Path(folder), Path(out)
    store = LabelStore(folder)
    try:
        store.sync_queue()
        votes: dict[str, Counter] = {}
        for (item, _), kind in store.current().items():
            votes.setdefault(item, Counter())[kind] += 1
    finally:
        store.close()
    rows, counts = [], Counter()
    for q in read_queue(folder):
        v = votes.get(str(q["id"]), Counter())
        label = resolve(v["like"], v["dislike"], policy)
        if label is None:
            counts["unlabelled" if not v else "only skipped" if not (v["like"] + v["dislike"]) else "disagreement"] += 1
            continue
        counts["liked" if label else "disliked"] += 1
        rows.append({"image": _image_path(folder, q["image"], out), "prompt": q["prompt"], "label": label,
                     "raters": v["like"] + v["dislike"], "likes": v["like"], "dislikes": v["dislike"],
                     "id": q["id"], **{k: q[k] for k in ("seed", "model") if k in q}})
    return rows, dict(counts)


def export_labels(folder: str | Path, out: str | Path, policy: str = "majority") -> dict:
    """Write the feedback JSONL at ``out`` (atomically; an existing file is never overwritten); the counts."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out")
    rows, counts = feedback_rows(folder, out, policy)
    if not rows:
        raise LabelError(f"{folder}: no image has a like or dislike that resolves under --policy {policy} ({counts})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return {"rows": len(rows), **counts}
