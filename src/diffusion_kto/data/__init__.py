"""Feedback data: read and validate like/dislike rows, draw them with the γ-sampler, transform them into batches."""
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

__all__ = [
    "DesirableSampler",
    "FeedbackDataset",
    "FeedbackError",
    "FeedbackRow",
    "FeedbackSummary",
    "MissingExtraError",
    "collate",
    "load_image",
    "parse_label",
    "read_feedback",
    "validate",
]
