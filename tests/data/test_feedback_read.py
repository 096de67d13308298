"""read_feedback round trips for every source, and bad inputs that name the file, the row and the column."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from diffusion_kto.data import FeedbackError, FeedbackRow, load_image, read_feedback

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_csv(path: Path, records: list[dict], delimiter=",") -> Path:
    """Write dicts as CSV with a header."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(records)
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    """Write a dict of column lists as parquet."""
    pq.write_table(pa.table(columns), path)
    return path


def expected(tmp_path: Path) -> list[tuple]:
    """(image, prompt, desirable) of the `records` fixture."""
    return [
        (tmp_path / "img/red.png", "a red square", True),
        (tmp_path / "img/green.png", "a green square", False),
        (tmp_path / "img/blue.png", "a blue square", True),
    ]


def triples(rows: list[FeedbackRow]) -> list[tuple]:
    """(image, prompt, desirable) of rows."""
    return [(r.image, r.prompt, r.desirable) for r in rows]


# ------------------------------------------------------------------------------------------ round trips


def test_jsonl_with_relative_paths(tmp_path, images, records, write_jsonl):
    rows = read_feedback(write_jsonl(tmp_path / "feedback.jsonl", records))
    assert triples(rows) == expected(tmp_path)
    assert rows[0].where.endswith("feedback.jsonl:1") and rows[2].where.endswith("feedback.jsonl:3")


def test_jsonl_with_absolute_paths_from_another_folder(tmp_path, images, records, write_jsonl):
    for record, image in zip(records, images):
        record["image"] = str(image)
    (tmp_path / "elsewhere").mkdir()
    rows = read_feedback(write_jsonl(tmp_path / "elsewhere/f.jsonl", records))
    assert triples(rows) == expected(tmp_path)


def test_jsonl_skips_blank_lines_and_counts_them(tmp_path, images, records):
    path = tmp_path / "f.jsonl"
    path.write_text("\n" + json.dumps(records[0]) + "\n\n  \n" + json.dumps(records[1]) + "\r\n", encoding="utf-8")
    rows = read_feedback(path)
    assert [r.where.rsplit(":", 1)[1] for r in rows] == ["2", "5"]


def test_jsonl_with_a_byte_order_mark(tmp_path, images, records):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in records).encode())
    assert triples(read_feedback(path)) == expected(tmp_path)


def test_jsonl_custom_column_names(tmp_path, images, write_jsonl):
    records = [{"file": "img/red.png", "caption": "red", "liked": True}, {"file": "img/blue.png", "caption": "b", "liked": False}]
    rows = read_feedback(write_jsonl(tmp_path / "f.jsonl", records), image_column="file", prompt_column="caption", label_column="liked")
    assert [(r.prompt, r.desirable) for r in rows] == [("red", True), ("b", False)]


def test_jsonl_image_as_a_path_record(tmp_path, images, write_jsonl):
    path = write_jsonl(tmp_path / "f.jsonl", [{"image": {"bytes": None, "path": "img/red.png"}, "prompt": "p", "label": "good"}])
    assert read_feedback(path)[0].image == tmp_path / "img/red.png"


def test_csv_with_paths(tmp_path, images, records):
    rows = read_feedback(write_csv(tmp_path / "feedback.csv", records))
    assert triples(rows) == expected(tmp_path)
    assert rows[0].where.endswith("feedback.csv:2")  # line 1 is the header


def test_csv_quoted_comma_and_multiline_prompt_keep_line_numbers(tmp_path, images):
    path = tmp_path / "f.csv"
    path.write_text(
        'image,prompt,label\nimg/red.png,"a cat, a dog",yes\nimg/blue.png,"two\nlines",no\nimg/green.png,third,win\n',
        encoding="utf-8",
    )
    rows = read_feedback(path)
    assert [r.prompt for r in rows] == ["a cat, a dog", "two\nlines", "third"]
    assert [r.where.rsplit(":", 1)[1] for r in rows] == ["2", "3", "5"]


def test_tsv(tmp_path, images, records):
    assert triples(read_feedback(write_csv(tmp_path / "f.tsv", records, delimiter="\t"))) == expected(tmp_path)


def test_parquet_with_paths(tmp_path, images, records):
    columns = {k: [r[k] for r in records] for k in ("image", "prompt")}
    columns["label"] = [True, False, True]
    rows = read_feedback(write_parquet(tmp_path / "feedback.parquet", columns))
    assert triples(rows) == expected(tmp_path)
    assert rows[1].where.endswith("feedback.parquet[1]")


def test_parquet_with_raw_bytes(tmp_path, png_bytes):
    data = [png_bytes((1, 2, 3)), png_bytes((4, 5, 6))]
    path = write_parquet(tmp_path / "f.parquet", {"image": data, "prompt": ["a", "b"], "label": ["like", "dislike"]})
    rows = read_feedback(path)
    assert [r.image for r in rows] == data
    assert load_image(rows[1]).getpixel((0, 0)) == (4, 5, 6)


def test_parquet_with_hf_image_structs(tmp_path, png_bytes):
    data = png_bytes((9, 9, 9))
    structs = [{"bytes": data, "path": "whatever.png"}, {"bytes": None, "path": "img/red.png"}]
    path = write_parquet(tmp_path / "f.parquet", {"image": structs, "prompt": ["a", "b"], "label": [1, 0]})
    rows = read_feedback(path)
    assert rows[0].image == data and rows[1].image == tmp_path / "img/red.png"


def test_image_folder_with_metadata_jsonl(tmp_path, images, write_jsonl):
    write_jsonl(tmp_path / "img/metadata.jsonl", [
        {"file_name": "red.png", "prompt": "red", "label": "liked"},
        {"file_name": "green.png", "prompt": "green", "label": "disliked"},
    ])
    rows = read_feedback(tmp_path / "img")
    assert triples(rows) == [(images[0], "red", True), (images[1], "green", False)]
    assert rows[1].where == str(tmp_path / "img" / "metadata.jsonl") + ":2"


def test_image_folder_with_metadata_csv(tmp_path, images):
    write_csv(tmp_path / "img/metadata.csv", [{"image": "blue.png", "prompt": "blue", "label": "desirable"}])
    assert triples(read_feedback(tmp_path / "img")) == [(images[2], "blue", True)]


def test_load_image_is_rgb_and_composites_transparency_on_white(tmp_path, png_bytes):
    rgba = FeedbackRow(png_bytes((0, 0, 0, 0), mode="RGBA"), "p", True, "x:1")
    grey = FeedbackRow(png_bytes(77, mode="L"), "p", True, "x:2")
    assert load_image(rgba).mode == "RGB" and load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(grey).getpixel((0, 0)) == (77, 77, 77)


def test_pil_images_become_png_bytes():
    from diffusion_kto.data.rows import check_image

    value = check_image(Image.new("RGB", (3, 3), (5, 6, 7)), "ds[0]", "image", None)
    assert isinstance(value, bytes) and value.startswith(b"\x89PNG")


# ------------------------------------------------------------------------------------------ bad inputs


def error_of(path, **kwargs) -> str:
    """The message of the FeedbackError that reading `path` raises."""
    with pytest.raises(FeedbackError) as info:
        read_feedback(path, **kwargs)
    return str(info.value)


def test_malformed_json_line_is_named(tmp_path, records, write_jsonl):
    path = write_jsonl(tmp_path / "f.jsonl", [records[0], '{"image": "a.png", "prompt": ', records[1]])
    message = error_of(path)
    assert "f.jsonl:2" in message and "malformed JSON" in message


def test_non_object_json_line(tmp_path, write_jsonl):
    message = error_of(write_jsonl(tmp_path / "f.jsonl", ["[1, 2]"]))
    assert "f.jsonl:1" in message and "JSON object" in message


def test_missing_key_in_jsonl_names_line_key_and_keys_present(tmp_path, records, write_jsonl):
    del records[2]["label"]
    message = error_of(write_jsonl(tmp_path / "f.jsonl", records))
    assert "f.jsonl:3" in message and "'label'" in message and "'image', 'prompt'" in message


def test_missing_column_in_csv_lists_columns_present(tmp_path, records):
    message = error_of(write_csv(tmp_path / "f.csv", records), label_column="liked")
    assert "f.csv:1" in message and "'liked'" in message and "'image', 'prompt', 'label'" in message


def test_missing_column_in_parquet_lists_columns_present(tmp_path):
    path = write_parquet(tmp_path / "f.parquet", {"img": ["a.png"], "prompt": ["p"], "label": [1]})
    message = error_of(path)
    assert "f.parquet" in message and "'image'" in message and "'img'" in message


def test_unknown_label_names_row_and_column(tmp_path, records, write_jsonl):
    records[1]["label"] = "meh"
    message = error_of(write_jsonl(tmp_path / "f.jsonl", records))
    assert "f.jsonl:2" in message and "'label'" in message and "'meh'" in message


def test_unknown_label_in_csv(tmp_path, records):
    records[2]["label"] = "3"
    message = error_of(write_csv(tmp_path / "f.csv", records))
    assert "f.csv:4" in message and "'3'" in message


def test_unknown_label_in_parquet(tmp_path):
    path = write_parquet(tmp_path / "f.parquet", {"image": ["a.png", "b.png"], "prompt": ["p", "q"], "label": [1, 7]})
    message = error_of(path)
    assert "f.parquet[1]" in message and "7" in message


@pytest.mark.parametrize("prompt", ["", "   ", None, 42])
def test_bad_prompt_names_row_and_column(tmp_path, records, prompt, write_jsonl):
    records[1]["prompt"] = prompt
    message = error_of(write_jsonl(tmp_path / "f.jsonl", records))
    assert "f.jsonl:2" in message and "'prompt'" in message


def test_empty_prompt_in_csv(tmp_path, records):
    records[0]["prompt"] = ""
    assert "f.csv:2" in error_of(write_csv(tmp_path / "f.csv", records))


def test_huge_prompt_is_an_error(tmp_path, records, write_jsonl):
    records[0]["prompt"] = "x" * 20_000
    message = error_of(write_jsonl(tmp_path / "f.jsonl", records))
    assert "f.jsonl:1" in message and "20000 characters" in message


@pytest.mark.parametrize("image", [None, "", 3, [1]])
def test_bad_image_value_names_row_and_column(tmp_path, records, image, write_jsonl):
    records[2]["image"] = image
    message = error_of(write_jsonl(tmp_path / "f.jsonl", records))
    assert "f.jsonl:3" in message and "'image'" in message


def test_csv_row_with_unquoted_comma(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("image,prompt,label\na.png,a cat, a dog,like\n", encoding="utf-8")
    message = error_of(path)
    assert "f.csv:2" in message and "4 fields" in message


def test_invalid_utf8_names_the_line(tmp_path, records):
    path = tmp_path / "f.jsonl"
    path.write_bytes(json.dumps(records[0]).encode() + b'\n{"prompt": "\xff"}\n')
    assert "f.jsonl:2" in error_of(path)
    path = tmp_path / "f.csv"
    path.write_bytes(b"image,prompt,label\na.png,ok,1\nb.png,\xfe\xff,0\n")
    assert "f.csv:3" in error_of(path)


@pytest.mark.parametrize("content", ["", "\n\n", "image,prompt,label\n"])
def test_empty_csv_is_an_error(tmp_path, content):
    path = tmp_path / "f.csv"
    path.write_text(content, encoding="utf-8")
    message = error_of(path)
    assert "f.csv" in message and ("empty" in message)


def test_empty_jsonl_is_an_error(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("\n", encoding="utf-8")
    assert "empty" in error_of(path)


def test_empty_parquet_is_an_error(tmp_path):
    schema = pa.schema([("image", pa.string()), ("prompt", pa.string()), ("label", pa.bool_())])
    pq.write_table(schema.empty_table(), tmp_path / "f.parquet")
    assert "empty" in error_of(tmp_path / "f.parquet")


def test_broken_parquet_file(tmp_path):
    (tmp_path / "f.parquet").write_bytes(b"not parquet at all")
    assert "f.parquet" in error_of(tmp_path / "f.parquet")


def test_missing_local_file_is_not_sent_to_the_hub(tmp_path):
    message = error_of(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in message and "no such file" in message


def test_unsupported_suffix(tmp_path):
    (tmp_path / "f.xlsx").write_bytes(b"")
    assert ".xlsx" in error_of(tmp_path / "f.xlsx")


def test_folder_without_metadata(tmp_path, images):
    assert "metadata.jsonl" in error_of(tmp_path / "img")


def test_hub_id_without_datasets_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install diffusion-kto\[data\]") as info:
        read_feedback("someone/some-feedback")
    assert isinstance(info.value, FeedbackError)  # so `dkto` prints it as a one-line error


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "f.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(FeedbackError, match=r"needs pyarrow: pip install diffusion-kto\[data\]"):
        read_feedback(tmp_path / "f.parquet")


def test_save_to_disk_folder_without_datasets_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved/dataset_info.json").write_text("{}")
    (tmp_path / "saved/state.json").write_text("{}")
    with pytest.raises(ImportError, match=r"pip install diffusion-kto\[data\]"):
        read_feedback(tmp_path / "saved")
