"""Feedback data: read and validate like/dislike rows, draw them with the γ-sampler (or stream them from shards), transform them into batches."""
from .bad_rows import BadRow
from .dataset import Batch, FeedbackDataset, collate
from .feedback import (
    FeedbackSummary,
    load_image,
    Screened,
    read_feedback,
    screen_feedback,
    validate,
)
from .rows import FeedbackError, FeedbackRow, MissingExtraError, parse_label
from .sampler import DesirableSampler, PairedDrawSampler, build_sampler
from .stream import StreamingFeedbackDataset, collate_stream

__all__ = [
    "BadRow",
    "Batch",
    "DesirableSampler",
    "PairedDrawSampler",
    "FeedbackDataset",
    "FeedbackError",
    "FeedbackRow",
    "FeedbackSummary",
    "MissingExtraError",
    "StreamingFeedbackDataset",
    "build_sampler",
    "collate",
    "collate_stream",
    "load_image",
    "parse_label",
    "Screened",
    "read_feedback",
    "screen_feedback",
    "validate",
]
