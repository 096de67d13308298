"""data.on_bad_row: every bad row named in one error, or skipped with counts per reason and a skipped-rows file."""
from __future__ import annotations

import json
import logging

import pytest

from tiny import BAD_ROW_COUNTS, write_bad_feedback
from diffusion_kto.data import BadRow, FeedbackError, read_feedback, screen_feedback
from diffusion_kto.data.bad_rows import error_message, skip_summary, split_where, write_skipped_rows


def _screen(path, skip, need_both_classes=True):
    """read_feedback collecting bad rows, then the validation pass."""
    bad: list[BadRow] = []
    rows = read_feedback(path, bad_rows=bad)
    return screen_feedback(rows, bad, skip=skip, need_both_classes=need_both_classes)


def test_error_names_every_kind_of_bad_row(tmp_path):
    path = write_bad_feedback(tmp_path / "d")
    with pytest.raises(FeedbackError) as info:
        _screen(path, skip=False)
    message = str(info.value)
    assert message.startswith("4 bad rows of 12 (1 missing image, 1 unreadable image, 1 unknown label, 1 empty prompt)")
    assert "data.on_bad_row=skip" in message
    for line, problem in ((2, "img1.png' not found"), (3, "img2.png' cannot be read"), (4, "unknown label 'maybe'"),
                          (5, "column 'prompt': prompt is empty")):
        assert f"feedback.jsonl:{line}: " in message and problem in message


def test_read_feedback_alone_names_every_row_problem(tmp_path, write_jsonl):
    lines = ['{"image": "a.png", "prompt": "p", "label": "maybe"}', "{oops", "[1, 2]",
             '{"image": "a.png", "label": 1}', '{"image": "a.png", "prompt": " ", "label": 0}',
             '{"image": "a.png", "prompt": "p", "label": 1}']
    with pytest.raises(FeedbackError) as info:
        read_feedback(write_jsonl(tmp_path / "f.jsonl", lines))
    message = str(info.value)
    assert message.startswith("5 bad rows of 6 (2 malformed row, 1 unknown label, 1 missing key, 1 empty prompt)")
    for line in range(1, 6):
        assert f"f.jsonl:{line}: " in message


def test_the_listing_is_capped(tmp_path, write_jsonl):
    lines = [json.dumps({"image": "a.png", "prompt": "p", "label": f"x{i}"}) for i in range(9)]
    with pytest.raises(FeedbackError) as info:
        read_feedback(write_jsonl(tmp_path / "f.jsonl", lines))
    message = str(info.value)
    assert message.startswith("9 bad rows of 9 (9 unknown label); no row is left to train on:")
    assert "f.jsonl:5: " in message and "f.jsonl:6: " not in message and "... and 4 more" in message


def test_skip_counts_logs_and_keeps_the_good_rows(tmp_path, caplog):
    path = write_bad_feedback(tmp_path / "d")
    with caplog.at_level(logging.WARNING, logger="diffusion_kto.data.feedback"):
        screened = _screen(path, skip=True)
    summary = screened.summary
    assert (summary.n, summary.n_desirable, summary.n_undesirable) == (8, 4, 4)
    assert summary.n_skipped == 4 and summary.skipped == BAD_ROW_COUNTS
    assert [row.where.rsplit(":", 1)[1] for row in screened.rows] == ["1", "6", "7", "8", "9", "10", "11", "12"]
    assert [(b.where.rsplit(":", 1)[1], b.reason) for b in screened.skipped] == [
        ("2", "missing image"), ("3", "unreadable image"), ("4", "unknown label"), ("5", "empty prompt")]
    assert ("skipped 4 of 12 rows: 1 missing image, 1 unreadable image, 1 unknown label, 1 empty prompt"
            in caplog.text)
    assert "feedback.jsonl:2: image" in caplog.text
    assert summary.describe() == "8 rows (4 liked, 4 disliked); " + skip_summary(BAD_ROW_COUNTS, 12)


def test_skip_without_bad_rows_is_quiet(tmp_path, feedback, caplog):
    with caplog.at_level(logging.WARNING):
        screened = _screen(feedback, skip=True)
    assert screened.summary.n == 8 and screened.summary.n_skipped == 0 and not screened.skipped
    assert "skipped" not in caplog.text


def test_skip_that_leaves_no_disliked_rows_is_an_error(tmp_path, write_jsonl, images):
    records = [{"image": "img/red.png", "prompt": "a red square", "label": "like"},
               {"image": "img/green.png", "prompt": "a green square", "label": "meh"},
               {"image": "img/nothing.png", "prompt": "a blue square", "label": 0}]
    path = write_jsonl(tmp_path / "f.jsonl", records)
    with pytest.raises(FeedbackError, match=r"f.jsonl: no disliked rows \(all 1 rows are liked after skipping 2 bad rows\)"):
        _screen(path, skip=True)
    assert _screen(path, skip=True, need_both_classes=False).summary.n == 1


def test_skip_that_leaves_no_rows_is_an_error(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "f.jsonl", [{"image": "gone.png", "prompt": "p", "label": 1}, "not json"])
    with pytest.raises(FeedbackError) as info:
        _screen(path, skip=True)
    message = str(info.value)
    assert message.startswith("2 bad rows of 2 (1 missing image, 1 malformed row); no row is left to train on:")
    assert "f.jsonl:1: image" in message and "f.jsonl:2: malformed JSON" in message


def test_csv_rows_are_skipped_by_physical_line(tmp_path, images):
    path = tmp_path / "f.csv"
    path.write_text('image,prompt,label\nimg/red.png,a red square,like\nimg/green.png,"a, b",x,1\n'
                    "img/blue.png,a blue square,dislike\nimg/blue.png,,1\n")
    screened = _screen(path, skip=True)
    assert screened.summary.skipped == {"malformed row": 1, "empty prompt": 1}
    assert [b.where for b in screened.skipped] == [f"{path}:3", f"{path}:5"]


def test_parquet_rows_are_skipped_by_index(tmp_path, images):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "f.parquet"
    columns = {"image": ["img/red.png", "img/green.png", None, "img/blue.png"],
               "prompt": ["a", "b", "c", "d"], "label": ["like", "dislike", "like", "unsure"]}
    pq.write_table(pa.table(columns), path)
    screened = _screen(path, skip=True)
    assert [(b.where, b.reason) for b in screened.skipped] == [(f"{path}[2]", "missing image"),
                                                               (f"{path}[3]", "unknown label")]


def test_skipped_rows_file_records_file_row_and_reason(tmp_path):
    path = write_bad_feedback(tmp_path / "d")
    screened = _screen(path, skip=True)
    written = write_skipped_rows(screened.skipped, tmp_path / "skipped_rows.jsonl")
    records = [json.loads(line) for line in written.read_text().splitlines()]
    assert [(r["file"], r["row"], r["reason"]) for r in records] == [
        (str(path), 2, "missing image"), (str(path), 3, "unreadable image"),
        (str(path), 4, "unknown label"), (str(path), 5, "empty prompt")]
    assert "img1.png' not found" in records[0]["detail"]


@pytest.mark.parametrize("where, expected", [
    ("f.jsonl:3", ("f.jsonl", 3)), ("data/f.parquet[0]", ("data/f.parquet", 0)),
    ("ds (train)[12]", ("ds (train)", 12)), ("c:/x.jsonl:7", ("c:/x.jsonl", 7)), ("no row", ("no row", None)),
])
def test_split_where(where, expected):
    assert split_where(where) == expected


def test_error_message_singular():
    message = error_message([BadRow("f.jsonl:2", "empty prompt", "column 'prompt': prompt is empty")], 3)
    assert message == ("1 bad row of 3 (1 empty prompt); fix them, or set data.on_bad_row=skip to train on the "
                       "other rows:\n  f.jsonl:2: column 'prompt': prompt is empty")
