"""parse_label: every accepted spelling, and a clear error for anything else."""
from __future__ import annotations

import numpy as np
import pytest

from diffusion_kto.data import FeedbackError, parse_label
from diffusion_kto.data.rows import FALSE_LABELS, TRUE_LABELS

LIKED = [True, 1, "1", "true", "like", "liked", "desirable", "yes", "good", "win"]
DISLIKED = [False, 0, "0", "false", "dislike", "disliked", "undesirable", "no", "bad", "lose"]


@pytest.mark.parametrize("value", LIKED + [" Like ", "TRUE", "Desirable\n", "WIN", np.int64(1), np.bool_(True), 1.0])
def test_liked_spellings(value):
    assert parse_label(value, "f.jsonl:3") is True


@pytest.mark.parametrize("value", DISLIKED + ["\tDislike", "FALSE", "Undesirable", "LOSE", np.int64(0), np.bool_(False), 0.0])
def test_disliked_spellings(value):
    assert parse_label(value, "f.jsonl:3") is False


def test_accepted_lists_match_the_documented_words():
    assert set(TRUE_LABELS) == {str(v) for v in LIKED if isinstance(v, str)} | {"true"}
    assert set(FALSE_LABELS) == {str(v) for v in DISLIKED if isinstance(v, str)} | {"false"}


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, -1, 0.5, float("nan"), None, [1], {"a": 1}, "likes", b"1"])
def test_unknown_label_names_value_row_and_accepted_values(value):
    with pytest.raises(FeedbackError) as info:
        parse_label(value, "feedback.jsonl:12", "liked")
    message = str(info.value)
    assert "feedback.jsonl:12" in message
    assert "'liked'" in message
    assert repr(value)[:20] in message
    assert "dislike" in message and "win" in message


def test_feedback_error_is_a_value_error():
    assert issubclass(FeedbackError, ValueError)
