"""Streaming from shards: the liked share is γ (the sampler's own classes), readers split shards without
duplicates, resume cursors, and errors that name the shard and key."""
import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from diffusion_kto.data import DesirableSampler, FeedbackError, FeedbackRow
from diffusion_kto.data.shards import write_shards
from diffusion_kto.data.stream import (
    ClassBuffers, Cursor, StreamingFeedbackDataset, check_readers, collate_stream, read_stream, start_cursor,
)

COLUMNS = ("image", "prompt", "label")


@pytest.fixture
def shards(tmp_path, png_bytes):
    """48 rows (12 liked: every 4th) in 6 tar shards of 8."""
    rows = [FeedbackRow(png_bytes((i, 0, 0)), f"prompt {i}", i % 4 == 0, f"src:{i}") for i in range(48)]
    return write_shards(rows, tmp_path / "shards", rows_per_shard=8)


def _dataset(shards, **kw):
    settings = dict(desirable_ratio=0.8, buffer_size=4, batch_size=4, seed=0, resolution=4)
    return StreamingFeedbackDataset(shards, **{**settings, **kw})


def _take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def test_classes_are_the_samplers_and_liked_share_is_gamma(shards):
    items = _take(_dataset(shards), 400)
    sampler = DesirableSampler([True, False], 0.8, seed=0, batch_size=4)  # row 0 liked, row 1 disliked
    assert [item["desirable"] for item in items] == [row == 0 for row, _ in itertools.islice(iter(sampler), 400)]
    assert [item["draw_id"] for item in items] == list(range(400))
    assert abs(np.mean([item["desirable"] for item in items]) - 0.8) < 0.06
    assert all(item["prompt"].startswith("prompt ") and item["pixel_values"].shape == (3, 4, 4) for item in items)


def test_buffers_draw_each_row_about_equally_often(shards):
    """A taken row leaves its buffer, so liked rows (read once per epoch) are drawn once per epoch, give or take
    the few still buffered; the over-represented disliked rows are subsampled but all turn up."""
    stream = read_stream(shards, COLUMNS, seed=0, reader=0, readers=1)
    buffers = ClassBuffers(stream, 4)
    rng = np.random.default_rng(0)
    first = [buffers.take(True, rng).prompt for _ in range(9)]
    assert len(set(first)) == 9  # 4 buffered + 8 read since: all from epoch 0, none twice
    counts = Counter(buffers.take(True, rng).prompt for _ in range(111)) + Counter(first)
    assert set(counts) == {f"prompt {i}" for i in range(0, 48, 4)}
    assert 9 <= min(counts.values()) and max(counts.values()) <= 11
    disliked = {buffers.take(False, rng).prompt for _ in range(200)}
    assert len(disliked) == 36


def test_same_seed_same_stream_other_seed_other_order(shards):
    prompts = lambda **kw: [item["prompt"] for item in _take(_dataset(shards, **kw), 24)]
    assert prompts() == prompts()
    assert prompts() != prompts(seed=1)


def test_readers_split_shards_without_duplicates(shards):
    """Two readers (2 ranks, or 2 DataLoader workers) read disjoint shards that together make the whole epoch."""
    for epoch in (0, 1):
        seen = []
        for reader in (0, 1):
            stream = read_stream(shards, COLUMNS, seed=0, reader=reader, readers=2, start=Cursor(epoch))
            seen.append([row.where for row, cursor in itertools.takewhile(lambda rc: rc[1].epoch == epoch, stream)])
        assert not set(seen[0]) & set(seen[1])
        assert len(seen[0]) == len(seen[1]) == 24 and len(set(seen[0] + seen[1])) == 48


def test_two_ranks_get_disjoint_draws_of_the_global_batch(shards):
    ranks = [_take(_dataset(shards, rank=r, world_size=2), 8) for r in (0, 1)]
    assert [i["draw_id"] for i in ranks[0]] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert [i["draw_id"] for i in ranks[1]] == [4, 5, 6, 7, 12, 13, 14, 15]
    assert {i["stream"][:2] for i in ranks[0]} == {(0, 2)} and {i["stream"][:2] for i in ranks[1]} == {(1, 2)}


def test_dataloader_workers_take_turns(shards):
    loader = torch.utils.data.DataLoader(_dataset(shards), batch_size=4, num_workers=2, collate_fn=collate_stream)
    batches = list(itertools.islice(iter(loader), 4))
    assert [b.draw_ids.tolist() for b in batches] == [list(range(4 * s, 4 * s + 4)) for s in range(4)]
    assert [b.stream[:2] for b in batches] == [(0, 2), (1, 2), (0, 2), (1, 2)]


def test_resume_starts_each_reader_at_its_cursor(shards):
    first = _take(_dataset(shards, buffer_size=1, desirable_ratio=0.0), 1)[0]
    reader, readers, *cursor, skipped = first["stream"]
    assert (reader, readers, cursor, skipped) == (0, 1, [0, 0, 2], 0)  # one disliked row needed two reads (row 0 liked)
    state = {"readers": 1, "cursors": {"0": cursor}, "skipped": {"0": 3}}
    resumed = _take(_dataset(shards, buffer_size=1, desirable_ratio=0.0, resume=state, start_step=1), 1)[0]
    assert resumed["stream"][2:] == (0, 0, 3, 3) and resumed["draw_id"] == 4  # the skipped count goes on
    assert start_cursor(state, 0, 1) == Cursor(0, 0, 2)
    assert start_cursor(state, 1, 2) == Cursor(0) and start_cursor(None, 0, 1) == Cursor()
    assert start_cursor({"readers": 2, "cursors": {"0": [3, 1, 5], "1": [2, 0, 1]}}, 0, 4) == Cursor(2)


def test_missing_class_is_an_error_after_a_whole_epoch(tmp_path, png_bytes):
    rows = [FeedbackRow(png_bytes(), "p", False, f"src:{i}") for i in range(3)]
    shards = write_shards(rows, tmp_path / "s")
    with pytest.raises(FeedbackError, match="no liked rows in a whole epoch"):
        _take(_dataset(shards), 8)
    assert len(_take(_dataset(shards, desirable_ratio=0.0), 5)) == 5


def test_bad_image_names_shard_and_key(tmp_path, png_bytes):
    rows = [FeedbackRow(png_bytes(), "p", True, "a"), FeedbackRow(b"not an image", "p", True, "b")]
    shards = write_shards(rows, tmp_path / "s")
    with pytest.raises(FeedbackError, match=r"train-000000\.tar:000000001: image \(12 bytes\) cannot be read"):
        _take(_dataset(shards, desirable_ratio=1.0, buffer_size=2), 4)


def test_more_readers_than_shards_is_refused(shards):
    check_readers(6, 6, "x")
    with pytest.raises(FeedbackError, match="6 shard.*for 8 readers"):
        _take(_dataset(shards, rank=0, world_size=8), 1)


def test_item_choices_follow_the_seed_like_the_in_memory_dataset(shards):
    """Caption dropout (like crops and flips) of streamed draw k is that of FeedbackDataset's draw k with the same seed."""
    from diffusion_kto.data.transforms import draw_choices

    for seed in (0, 7):
        items = _take(_dataset(shards, seed=seed, caption_dropout=0.5), 48)
        assert [item["prompt"] == "" for item in items] == [
            draw_choices(seed, item["draw_id"], 0.5).drop_caption for item in items]


def _shards_with_bad_rows(tmp_path, png_bytes):
    """12 rows in 2 shards; rows 2 (undecodable image) and 7 (label "maybe") are bad."""
    import io
    import json
    import tarfile

    rows = [FeedbackRow(png_bytes((20 * i, 0, 0)), f"prompt {i}", i % 2 == 0, f"src:{i}") for i in range(12)]
    rows[2] = FeedbackRow(b"not an image", "prompt 2", True, "src:2")
    shards = write_shards(rows, tmp_path / "s", rows_per_shard=6)
    members = []
    with tarfile.open(shards[1]) as tar:  # rewrite row 7's label in the second shard
        for info in tar:
            data = tar.extractfile(info).read()
            if info.name == "000000007.json":
                data = json.dumps({"prompt": "prompt 7", "label": "maybe"}).encode()
            members.append((info.name, data))
    with tarfile.open(shards[1], "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return shards


def test_on_bad_row_skip_passes_over_bad_rows_counts_and_names_them(tmp_path, png_bytes, caplog):
    import logging

    shards = _shards_with_bad_rows(tmp_path, png_bytes)
    skipped = Counter()
    with caplog.at_level(logging.WARNING):
        rows = [row for row, _ in itertools.islice(
            read_stream(shards, COLUMNS, seed=0, reader=0, readers=1, skip_bad=True, skipped=skipped), 10)]
    assert sorted(int(r.prompt.split()[1]) for r in rows) == [0, 1, 3, 4, 5, 6, 8, 9, 10, 11]
    assert skipped == {"unreadable image": 1, "unknown label": 1}
    assert "train-000000.tar:000000002" in caplog.text and "train-000001.tar:000000007" in caplog.text


def test_on_bad_row_skip_counts_travel_with_the_items(tmp_path, png_bytes):
    """Every item carries its reader's count of skipped rows, so the trainer can report them."""
    shards = _shards_with_bad_rows(tmp_path, png_bytes)
    items = _take(_dataset(shards, desirable_ratio=0.5, buffer_size=2, skip_bad=True), 24)
    assert all(item["desirable"] in (True, False) for item in items)
    counts = [item["stream"][-1] for item in items]
    assert counts == sorted(counts) and counts[-1] >= 2  # an epoch and more: each bad row met at least once
    batch = collate_stream(items[:4])
    assert len(batch.stream) == 6 and batch.stream[-1] == items[3]["stream"][-1]


def test_on_bad_row_error_stops_at_the_bad_row_naming_shard_and_key(tmp_path, png_bytes):
    shards = _shards_with_bad_rows(tmp_path, png_bytes)
    with pytest.raises(FeedbackError, match=r"train-000001\.tar:000000007: column 'label': unknown label"):
        list(itertools.islice(read_stream(shards, COLUMNS, seed=0, reader=0, readers=1), 20))
