"""Output folders of conversions, pairs and shards: a fresh folder, images stored once, JSON lines written whole.

Written feedback files reference their images relative to their own folder (the rule every reader applies), and
images that come as bytes are written under ``images/``, named by a plain id or their content hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .rows import FeedbackError

IMAGES_DIR = "images"


def prepare_out_dir(out_dir: str | Path, with_images: bool = True) -> Path:
    """Create the output folder (and its images/ folder); refuse one that exists and is not empty."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FeedbackError(f"{out}: output folder exists and is not empty; choose another --out")
    (out / IMAGES_DIR if with_images else out).mkdir(parents=True, exist_ok=True)
    return out


def remove_if_empty(folder: Path) -> None:
    """Remove a folder that ended up empty (conversions that only reference existing files)."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def image_suffix(data: bytes) -> str:
    """A file suffix from an encoded image's magic bytes (".img" when unknown; PIL does not need it)."""
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return ".gif"
    return ".img"


def image_key(image: Path | bytes) -> str:
    """An identity for an image: "path:" + its resolved path, or "sha1:" + the SHA-1 of its bytes."""
    if isinstance(image, bytes):
        return "sha1:" + hashlib.sha1(image).hexdigest()
    return "path:" + str(Path(image).resolve())


def _safe_stem(name: str) -> str:
    """A file-name-safe stem: `name` itself when it is plain (a UUID), else its SHA-1."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        return name
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


def write_image(out: Path, stem: str, data: bytes) -> str:
    """Write encoded image bytes under out/images/; return the path relative to `out` (POSIX form)."""
    relative = f"{IMAGES_DIR}/{_safe_stem(stem)}{image_suffix(data)}"
    (out / relative).write_bytes(data)
    return relative


def relative_to(path: Path, out: Path) -> str:
    """`path` written relative to `out` when possible (feedback files resolve paths against their folder)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), out.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(Path(path).resolve())


def store_image(out: Path, image: Path | bytes) -> str:
    """Bytes written under out/images/ (named by content hash); a path referenced relative to `out`."""
    if isinstance(image, bytes):
        return write_image(out, hashlib.sha1(image).hexdigest(), image)
    return relative_to(image, out)


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write records as JSON lines through a temporary file, so a failed run leaves no partial file; the count."""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n
