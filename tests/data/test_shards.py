"""Tar / parquet feedback shards: writing, listing patterns, reading back, and errors naming the shard and key."""
import io
import json
import tarfile

import pytest

from diffusion_kto.data import FeedbackError, FeedbackRow
from diffusion_kto.data.shards import expand_braces, list_shards, read_shard, shard_pattern, write_shards

COLUMNS = ("image", "prompt", "label")


def _rows(png_bytes, n):
    return [FeedbackRow(png_bytes((10 * i, 0, 0)), f"prompt {i}", i % 3 == 0, f"src:{i}") for i in range(n)]


def _tar(path, members):
    """A tar shard from (name, bytes) members."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_write_then_read_round_trip(tmp_path, png_bytes):
    rows = _rows(png_bytes, 7)
    paths = write_shards(rows, tmp_path / "shards", rows_per_shard=3)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    pattern = shard_pattern(paths)
    assert pattern.endswith("train-{000000..000002}.tar")
    assert list_shards(pattern) == paths == list_shards(tmp_path / "shards") == list_shards(tmp_path / "shards/*.tar")
    back = [row for path in paths for row in read_shard(path, COLUMNS)]
    assert [(r.image, r.prompt, r.desirable) for r in back] == [(r.image, r.prompt, r.desirable) for r in rows]
    assert back[4].where == f"{paths[1]}:000000004"
    assert [r.prompt for r in read_shard(paths[1], COLUMNS, skip=2)] == ["prompt 5"]


def test_image_paths_are_stored_as_bytes(tmp_path, png_bytes):
    (tmp_path / "a.png").write_bytes(png_bytes())
    rows = [FeedbackRow(tmp_path / "a.png", "a red square", True, "f:1")]
    (row,) = read_shard(write_shards(rows, tmp_path / "out")[0], COLUMNS)
    assert row.image == png_bytes() and row.desirable


def test_parquet_shards_and_custom_columns(tmp_path, png_bytes):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"img": [png_bytes()], "caption": ["a red square"], "liked": ["dislike"]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    (row,) = read_shard(tmp_path / "part-0.parquet", ("img", "caption", "liked"))
    assert row.prompt == "a red square" and not row.desirable and row.where.endswith("part-0.parquet[0]")


def test_brace_ranges():
    assert expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{1..2}/{0..1}.tar") == ["1/0.tar", "1/1.tar", "2/0.tar", "2/1.tar"]
    with pytest.raises(FeedbackError, match="counts down"):
        expand_braces("s-{3..1}.tar")


def test_listing_errors(tmp_path):
    with pytest.raises(FeedbackError, match="no such shard file"):
        list_shards(tmp_path / "train-{0..1}.tar")
    with pytest.raises(FeedbackError, match="no shard matches"):
        list_shards(tmp_path / "*.tar")
    with pytest.raises(FeedbackError, match="holds no .tar or .parquet"):
        list_shards(tmp_path)
    (tmp_path / "x.zip").write_bytes(b"")
    with pytest.raises(FeedbackError, match="unsupported shard type"):
        list_shards(tmp_path / "x.zip")


@pytest.mark.parametrize("members, message", [
    ([("k1.json", b'{"prompt": "p", "label": true}')], r"s\.tar:k1: no image member"),
    ([("k1.png", b"png")], r"s\.tar:k1: no k1\.json member"),
    ([("k1.png", b"png"), ("k1.json", b"{oops")], r"s\.tar:k1: k1\.json is not valid JSON"),
    ([("k1.png", b"png"), ("k1.json", b"[1]")], r"s\.tar:k1: k1\.json must hold an object"),
    ([("k1.png", b"png"), ("k1.json", b'{"label": 1}')], r"s\.tar:k1: k1\.json: missing key 'prompt'"),
    ([("k1.png", b"png"), ("k1.json", b'{"prompt": "p", "label": "maybe"}')], r"s\.tar:k1: column 'label': unknown label"),
    ([("k1.png", b"png"), ("k1.json", b'{"prompt": " ", "label": 1}')], r"s\.tar:k1: column 'prompt': prompt is empty"),
])
def test_bad_samples_name_shard_and_key(tmp_path, members, message):
    good = [("k0.png", b"png"), ("k0.json", json.dumps({"prompt": "ok", "label": 0}).encode())]
    shard = _tar(tmp_path / "s.tar", good + members)
    rows = read_shard(shard, COLUMNS)
    assert next(rows).prompt == "ok"  # the good sample before the bad one is read
    with pytest.raises(FeedbackError, match=message):
        next(rows)


def test_broken_tar_names_the_shard(tmp_path):
    (tmp_path / "s.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(FeedbackError, match=r"s\.tar: cannot read tar shard"):
        list(read_shard(tmp_path / "s.tar", COLUMNS))


def test_dkto_convert_shards(tmp_path, images, records, write_jsonl, capsys):
    from diffusion_kto.cli import main

    src = write_jsonl(tmp_path / "feedback.jsonl", records)
    assert main(["convert", "shards", "--src", str(src), "--out", str(tmp_path / "s"), "--rows-per-shard", "2"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 rows (2 liked, 1 disliked) in 2 shards" in printed and "train-{000000..000001}.tar" in printed
    assert [r.prompt for p in list_shards(tmp_path / "s") for r in read_shard(p, COLUMNS)] == [
        "a red square", "a green square", "a blue square"]
    assert main(["convert", "shards", "--src", str(src), "--out", str(tmp_path / "s")]) == 2  # not empty


@pytest.mark.parametrize("members, reason", [
    ([("k1.json", b'{"prompt": "p", "label": true}')], "missing image"),
    ([("k1.png", b"png")], "malformed row"),
    ([("k1.png", b"png"), ("k1.json", b"{oops")], "malformed row"),
    ([("k1.png", b"png"), ("k1.json", b'{"label": 1}')], "missing key"),
    ([("k1.png", b"png"), ("k1.json", b'{"prompt": "p", "label": "maybe"}')], "unknown label"),
])
def test_shard_entries_give_bad_samples_as_bad_rows(tmp_path, members, reason):
    """What read_shard raises for a sample, shard_entries gives as a BadRow (data.on_bad_row=skip passes it over)."""
    from diffusion_kto.data import BadRow
    from diffusion_kto.data.shards import shard_entries

    good = [("k0.png", b"png"), ("k0.json", json.dumps({"prompt": "ok", "label": 0}).encode())]
    after = [("k2.png", b"png"), ("k2.json", json.dumps({"prompt": "after", "label": 1}).encode())]
    entries = list(shard_entries(_tar(tmp_path / "s.tar", good + members + after), COLUMNS))
    assert [e.prompt for e in entries if isinstance(e, FeedbackRow)] == ["ok", "after"]
    (bad,) = [e for e in entries if isinstance(e, BadRow)]
    assert bad.where == f"{tmp_path / 's.tar'}:k1" and bad.reason == reason
