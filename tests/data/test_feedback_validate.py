"""validate(): broken images counted in one message, class checks for kto, duplicates as a warning."""
from __future__ import annotations

import logging

import pytest

from diffusion_kto.data import FeedbackError, FeedbackRow, FeedbackSummary, read_feedback, screen_feedback, validate


def test_summary_counts(tmp_path, images, records, write_jsonl):
    rows = read_feedback(write_jsonl(tmp_path / "f.jsonl", records))
    assert validate(rows, need_both_classes=True) == FeedbackSummary(n=3, n_desirable=2, n_undesirable=1)


def test_bytes_images_are_checked(tmp_path, png_bytes):
    rows = [FeedbackRow(png_bytes(), "p", True, "f.parquet[0]"), FeedbackRow(b"garbage", "q", False, "f.parquet[1]")]
    with pytest.raises(FeedbackError, match=r"1 bad row of 2 \(1 unreadable image\).*\n  f.parquet\[1\]: image \(7 bytes\) cannot be read"):
        validate(rows, need_both_classes=False)


def test_missing_image_names_row_and_counts_the_others(tmp_path, images, records, write_jsonl):
    records += [{"image": f"img/missing{i}.png", "prompt": "p", "label": 0} for i in range(3)]
    rows = read_feedback(write_jsonl(tmp_path / "feedback.jsonl", records))
    with pytest.raises(FeedbackError) as info:
        validate(rows, need_both_classes=True)
    message = str(info.value)
    assert message.startswith("3 bad rows of 6 (3 missing image)")
    assert "feedback.jsonl:4: image '" in message and "missing0.png' not found" in message
    assert "feedback.jsonl:5" in message and "feedback.jsonl:6" in message


def test_unreadable_image_is_named(tmp_path, images, records, write_jsonl):
    (tmp_path / "img/green.png").write_bytes(b"\x89PNG but not really")
    rows = read_feedback(write_jsonl(tmp_path / "feedback.jsonl", records))
    with pytest.raises(FeedbackError, match=r"1 bad row of 3 \(1 unreadable image\).*\n  .*feedback.jsonl:2: image '.*green.png' cannot be read"):
        validate(rows, need_both_classes=False)


def test_truncated_image_is_named(tmp_path, images, records, write_jsonl):
    data = (tmp_path / "img/red.png").read_bytes()
    (tmp_path / "img/red.png").write_bytes(data[: len(data) // 2])
    rows = read_feedback(write_jsonl(tmp_path / "f.jsonl", records))
    with pytest.raises(FeedbackError, match=r"f.jsonl:1: image"):
        validate(rows, need_both_classes=False)


def test_directory_instead_of_image(tmp_path, images, records, write_jsonl):
    records[0]["image"] = "img"
    rows = read_feedback(write_jsonl(tmp_path / "f.jsonl", records))
    with pytest.raises(FeedbackError, match="is not a file"):
        validate(rows, need_both_classes=False)


def test_check_images_false_skips_the_image_check(tmp_path, records, write_jsonl):
    rows = read_feedback(write_jsonl(tmp_path / "f.jsonl", records))  # no image files exist
    assert validate(rows, need_both_classes=True, check_images=False).n == 3


def test_no_liked_rows(tmp_path, images, records, write_jsonl):
    for record in records:
        record["label"] = "dislike"
    rows = read_feedback(write_jsonl(tmp_path / "feedback.jsonl", records))
    with pytest.raises(FeedbackError) as info:
        validate(rows, need_both_classes=True)
    message = str(info.value)
    assert "feedback.jsonl" in message and "no liked rows" in message and "`kto`" in message
    assert validate(rows, need_both_classes=False).n_undesirable == 3


def test_no_disliked_rows(tmp_path, images, records, write_jsonl):
    records[1]["label"] = "win"
    rows = read_feedback(write_jsonl(tmp_path / "f.parquet_like.jsonl", records))
    with pytest.raises(FeedbackError, match="no disliked rows"):
        validate(rows, need_both_classes=True)


def test_one_class_error_names_the_objective(tmp_path, images, records, write_jsonl):
    """The refusal names the objective the user chose (bench regimes' likes-only rows once said `kto` for bco)."""
    for record in records:
        record["label"] = "like"
    rows = read_feedback(write_jsonl(tmp_path / "feedback.jsonl", records))
    with pytest.raises(FeedbackError) as info:
        screen_feedback(rows, need_both_classes=True, objective="bco")
    assert "the `bco` objective needs both" in str(info.value) and "loss.name=sft" in str(info.value)


def test_empty_rows():
    with pytest.raises(FeedbackError, match="empty"):
        validate([], need_both_classes=False)


def test_duplicates_are_a_warning_not_an_error(tmp_path, images, records, caplog, write_jsonl):
    records += [dict(records[0]), dict(records[0], label="dislike")]
    rows = read_feedback(write_jsonl(tmp_path / "f.jsonl", records))
    with caplog.at_level(logging.WARNING, logger="diffusion_kto.data.feedback"):
        summary = validate(rows, need_both_classes=True)
    assert summary.n == 5
    text = caplog.text
    assert "2 duplicate" in text and "1 of them with the opposite label" in text and "f.jsonl:1" in text and "f.jsonl:4" in text


def test_no_warning_without_duplicates(tmp_path, images, records, caplog, write_jsonl):
    rows = read_feedback(write_jsonl(tmp_path / "f.jsonl", records))
    with caplog.at_level(logging.WARNING):
        validate(rows, need_both_classes=True)
    assert "duplicate" not in caplog.text
