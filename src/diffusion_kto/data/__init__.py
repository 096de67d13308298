"""Feedback data: read and validate like/dislike rows, draw them with the γ-sampler (or stream them from shards), transform them into batches."""
from .dataset import FeedbackDataset, collate
from .feedback import (
    FeedbackError,
    FeedbackRow,
    FeedbackSummary,
    MissingExtraError,
    load_image,
    parse_label,
    read_feedback,
    validate,
)
from .sampler import DesirableSampler
from .stream import StreamingFeedbackDataset, collate_stream

__all__ = [
    "DesirableSampler",
    "FeedbackDataset",
    "FeedbackError",
    "FeedbackRow",
    "FeedbackSummary",
    "MissingExtraError",
    "StreamingFeedbackDataset",
    "collate",
    "collate_stream",
    "load_image",
    "parse_label",
    "read_feedback",
    "validate",
]
