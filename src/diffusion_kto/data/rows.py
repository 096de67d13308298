"""Feedback rows and their fields: the row type, the errors, and the checks every reader applies to each value.

Diffusion-KTO (arXiv 2404.04465) §4 trains on per-image binary feedback: each row says whether one image is
desirable for its prompt. Whatever the source (records.py), a row becomes a `FeedbackRow` through `make_row`,
and every problem is a `FeedbackError` that names the file, the row (1-based line for JSONL / CSV, 0-based
index for parquet and datasets) and the key or column at fault. A problem confined to one row is a `BadRow`
(bad_rows.py), so that the validation pass (feedback.py) can collect or skip it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from ..errors import UserError
from .bad_rows import BadRow

TRUE_LABELS = ("true", "1", "like", "liked", "desirable", "yes", "good", "win")
FALSE_LABELS = ("false", "0", "dislike", "disliked", "undesirable", "no", "bad", "lose")
MAX_PROMPT_CHARS = 10_000  # far beyond any text encoder's context (CLIP: 77 tokens, T5: 512); longer is a data bug
FEEDBACK_OPTIONS = ("image_column", "prompt_column", "label_column")  # the options naming a feedback source's columns


class FeedbackError(UserError, ValueError):
    """A problem with feedback data; the message names the file, the row and the key or column."""


class MissingExtraError(FeedbackError, ImportError):
    """An optional dependency needed for this source is not installed; the message names the pip extra."""


class RowError(FeedbackError):
    """A problem confined to one row (the rest of the source is readable); `reason` is what counts group it by."""

    def __init__(self, where: str, reason: str, detail: str):
        """The error "where: detail", carrying the BadRow(where, reason, detail) that collects it."""
        super().__init__(f"{where}: {detail}")
        self.bad_row = BadRow(where, reason, detail)


@dataclass(frozen=True)
class FeedbackRow:
    """One piece of feedback: an image (a path or encoded bytes), its prompt, and whether it was liked."""

    image: Path | bytes
    prompt: str
    desirable: bool
    where: str


Entry = FeedbackRow | BadRow  # what reading one row of a source gives
T = TypeVar("T")


def or_raise(entry: T | BadRow) -> T:
    """`entry` itself, or its BadRow as a FeedbackError (streams and conversions stop at the first bad row)."""
    if isinstance(entry, BadRow):
        raise FeedbackError(str(entry))
    return entry


def first_line(err: Exception) -> str:
    """The first line of an exception's message, shortened to 200 characters."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text[:200]


def short(value: Any, limit: int = 60) -> str:
    """repr() of a value, cut to `limit` characters so error messages stay readable."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


# ---------------------------------------------------------------------------------------------- labels


def parse_label(value: Any, where: str, column: str = "label") -> bool:
    """Map a like/dislike label (bool, 1/0, or a word such as "like", "bad", "win") to desirable True/False."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        if value == 1:
            return True
        if value == 0:
            return False
    elif isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_LABELS:
            return True
        if word in FALSE_LABELS:
            return False
    raise RowError(
        where, "unknown label", f"column '{column}': unknown label {short(value)}; accepted (case-insensitive): "
        f"liked = True, {', '.join(TRUE_LABELS)}; disliked = False, {', '.join(FALSE_LABELS)}"
    )


def _parse_present_label(value: Any, where: str, column: str) -> bool:
    """parse_label, with a clearer message for a null label."""
    if value is None:
        raise RowError(where, "missing label", f"column '{column}': label is missing (null)")
    return parse_label(value, where, column)


# ---------------------------------------------------------------------------------------------- prompts and images


def check_prompt(value: Any, where: str, column: str) -> str:
    """The prompt as a non-empty, encodable string of at most MAX_PROMPT_CHARS characters."""
    if value is None:
        raise RowError(where, "missing prompt", f"column '{column}': prompt is missing (null)")
    if not isinstance(value, str):
        kind = type(value).__name__
        raise RowError(where, "invalid prompt", f"column '{column}': prompt must be text, got {kind} {short(value)}")
    if not value.strip():
        raise RowError(where, "empty prompt", f"column '{column}': prompt is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise RowError(
            where, "invalid prompt", f"column '{column}': prompt is {len(value)} characters long "
            f"(limit {MAX_PROMPT_CHARS}); is a column or a quote misplaced?"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError(where, "invalid prompt", f"column '{column}': prompt is not valid unicode ({err.reason})") from None
    return value


def check_image(value: Any, where: str, column: str, base: Path | None) -> Path | bytes:
    """The image as a path (relative ones resolved against `base`) or encoded bytes; HF {bytes, path} structs and
    PIL images (decoded HF `Image` values, kept as PNG bytes) are accepted too."""
    if isinstance(value, dict):
        return _image_struct(value, where, column, base)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise RowError(where, "unreadable image", f"column '{column}': image bytes are empty")
        return bytes(value)
    if isinstance(value, Image.Image):
        return _png_bytes(value)
    if isinstance(value, Path):
        value = str(value)
    if value is None:
        raise RowError(where, "missing image", f"column '{column}': image is missing (null)")
    if not isinstance(value, str):
        raise RowError(
            where, "invalid image", f"column '{column}': image must be a path, bytes or a {{'bytes', 'path'}} "
            f"record, got {type(value).__name__} {short(value)}"
        )
    if not value.strip():
        raise RowError(where, "missing image", f"column '{column}': image path is empty")
    if "\x00" in value:
        raise RowError(where, "invalid image", f"column '{column}': image path {short(value)} contains a NUL character")
    path = Path(value)  # no "~" expansion: a data file names files, not users' homes
    return path if path.is_absolute() or base is None else base / path


def _image_struct(value: dict, where: str, column: str, base: Path | None) -> Path | bytes:
    """The image of an HF {bytes, path} struct: its bytes when present, else its path."""
    data, path = value.get("bytes"), value.get("path")
    if data is not None:
        return check_image(data, where, column, base)
    if path is not None:
        return check_image(path, where, column, base)
    raise RowError(where, "missing image", f"column '{column}': image has neither 'bytes' nor 'path'")


def _png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image as PNG bytes (how decoded HF `Image` values are kept)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- rows


def make_row(fields: dict, where: str, columns: tuple[str, str, str], base: Path | None) -> Entry:
    """A FeedbackRow from one record that has the (image, prompt, label) columns, or the BadRow saying what is
    wrong with it; relative image paths are resolved against `base`."""
    image_column, prompt_column, label_column = columns
    try:
        return FeedbackRow(
            image=check_image(fields[image_column], where, image_column, base),
            prompt=check_prompt(fields[prompt_column], where, prompt_column),
            desirable=_parse_present_label(fields[label_column], where, label_column),
            where=where,
        )
    except RowError as err:
        return err.bad_row
