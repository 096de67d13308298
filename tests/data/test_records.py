"""The one reader stack (records.py): the same source rule, the same errors and the same rows for feedback, conversions and shards."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from diffusion_kto.data import FeedbackError, MissingExtraError, read_feedback
from diffusion_kto.data.convert import pairs_to_feedback, pickapic_to_feedback
from diffusion_kto.data.records import Columns, locate, source_records
from diffusion_kto.data.shards import read_shard

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

COLUMNS = ("image", "prompt", "label")


def error_of(call, *args, **kwargs) -> FeedbackError:
    """The FeedbackError that `call(*args, **kwargs)` raises (iterating it when it returns an iterator)."""
    with pytest.raises(FeedbackError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return info.value


# ---------------------------------------------------------------------------------------------- local path or hub id


@pytest.mark.parametrize("src", ["someone/feedback", "pickapic_v2", "org.name/data-set_v1.2"])
def test_hub_shaped_ids_go_to_the_hub(src):
    assert locate(src) == src


@pytest.mark.parametrize(
    "src", ["missing.jsonl", "someone/feedback.parquet", "./feedback", "~/nothing-here-xyz", "/abs/feedback",
            "a/b/c", "a\\b", "two words/x", "data:set"],
)
def test_everything_else_missing_is_no_such_file(src):
    with pytest.raises(FeedbackError, match="no such file or folder"):
        locate(src)


def test_existing_paths_win_over_the_hub_shape(tmp_path, monkeypatch):
    (tmp_path / "someone").mkdir()
    (tmp_path / "someone" / "feedback").mkdir()
    monkeypatch.chdir(tmp_path)
    assert locate("someone/feedback") == Path("someone/feedback")


def test_every_reader_applies_the_same_rule(tmp_path):
    missing = str(tmp_path / "gone.parquet")
    messages = {
        str(error_of(read_feedback, missing)),
        str(error_of(pickapic_to_feedback, missing, tmp_path / "out1")),
        str(error_of(pairs_to_feedback, missing, tmp_path / "out2")),
    }
    assert messages == {f"{missing}: no such file or folder"}


# ---------------------------------------------------------------------------------------------- missing extras


def test_missing_pyarrow_is_one_error_from_every_path(tmp_path, monkeypatch):
    (tmp_path / "f.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    errors = [
        error_of(read_feedback, tmp_path / "f.parquet"),
        error_of(pickapic_to_feedback, tmp_path / "f.parquet", tmp_path / "out1"),
        error_of(pairs_to_feedback, tmp_path / "f.parquet", tmp_path / "out2"),
        error_of(read_shard, tmp_path / "f.parquet", COLUMNS),
    ]
    assert all(isinstance(err, MissingExtraError) and isinstance(err, ImportError) for err in errors)
    assert {str(err) for err in errors} == {"reading parquet needs pyarrow: pip install diffusion-kto[data]"}


def test_missing_datasets_is_one_error_from_every_hub_path(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    errors = [
        error_of(read_feedback, "someone/data"),
        error_of(pickapic_to_feedback, "someone/data", tmp_path / "out1"),
        error_of(pairs_to_feedback, "someone/data", tmp_path / "out2"),
    ]
    assert all(isinstance(err, MissingExtraError) for err in errors)
    assert {str(err) for err in errors} == {
        "'someone/data' is not a local file or folder; reading Hugging Face datasets (save_to_disk folders, "
        "hub ids) needs `datasets`: pip install diffusion-kto[data]"
    }


# ---------------------------------------------------------------------------------------------- the same rows and errors


def test_a_malformed_line_reads_the_same_in_feedback_and_conversions(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a.png", "rejected": "b.png", "label": 1, "image": "a.png"}\n{oops\n')
    feedback = str(error_of(read_feedback, path))
    conversion = str(error_of(pairs_to_feedback, path, tmp_path / "out"))
    assert conversion.startswith(f"{path}:2: malformed JSON (") and conversion in feedback


def test_a_missing_key_reads_the_same_in_feedback_and_conversions(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"image": "a.png", "label": 1}) + "\n")
    expected = f"{path}:1: missing key 'prompt' (keys present: 'image', 'label')"
    assert expected in str(error_of(read_feedback, path))
    assert str(error_of(pairs_to_feedback, path, tmp_path / "out", chosen_column="image", rejected_column="label")) \
        == expected


def test_parquet_records_keep_optional_columns_when_present(tmp_path):
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"], "c": [True, False]}), tmp_path / "t.parquet")
    records = list(source_records(tmp_path / "t.parquet", Columns(("a",), optional=("c", "zz"))))
    assert [(r.where, r.fields, r.base) for r in records] == [
        (f"{tmp_path / 't.parquet'}[0]", {"a": 1, "c": True}, tmp_path),
        (f"{tmp_path / 't.parquet'}[1]", {"a": 2, "c": False}, tmp_path),
    ]


def test_a_parquet_folder_is_read_by_feedback_too(tmp_path, images):
    folder = tmp_path / "parts"
    folder.mkdir()
    rows = {"image": [str(images[0]), str(images[1])], "prompt": ["a", "b"], "label": [1, 0]}
    pq.write_table(pa.table(rows), folder / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({**rows, "label": [0, 0]}), folder / "test-00000-of-00001.parquet")
    feedback = read_feedback(folder)
    assert [(r.prompt, r.desirable) for r in feedback] == [("a", True), ("b", False)]
    assert feedback[1].where == str(folder / "train-00000-of-00001.parquet") + "[1]"
    assert [r.desirable for r in read_feedback(folder, split="test")] == [False, False]


def test_pairs_from_a_tsv(tmp_path, images):
    (tmp_path / "p.tsv").write_text("prompt\tchosen\trejected\nred vs green\timg/red.png\timg/green.png\n")
    summary = pairs_to_feedback(tmp_path / "p.tsv", tmp_path / "out")
    assert (summary.liked, summary.disliked) == (1, 1)


def test_missing_shard_column_names_the_option(tmp_path):
    pq.write_table(pa.table({"img": [b"x"], "prompt": ["p"], "label": [1]}), tmp_path / "s.parquet")
    message = str(error_of(read_shard, tmp_path / "s.parquet", COLUMNS))
    assert "no column 'image' (columns present: 'img', 'prompt', 'label')" in message
    assert "pick the right one with image_column=" in message
