"""FeedbackDataset and collate: shapes, ranges, deterministic per-draw randomness, caption dropout."""
from __future__ import annotations

import io
import itertools

import pytest
import torch
from PIL import Image

from diffusion_kto.data import DesirableSampler, FeedbackDataset, FeedbackError, FeedbackRow, collate
from diffusion_kto.data.transforms import crop_square, draw_choices, resize_shorter_side


def gradient_png(width=40, height=24) -> bytes:
    """A PNG whose red channel grows left to right and green top to bottom (so crops and flips are visible)."""
    image = Image.new("RGB", (width, height))
    image.putdata([(255 * x // (width - 1), 255 * y // (height - 1), 0) for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def rows():
    """Two rows with gradient images, one liked and one disliked."""
    return [FeedbackRow(gradient_png(), "a gradient", True, "f.jsonl:1"), FeedbackRow(gradient_png(30, 50), "tall", False, "f.jsonl:2")]


def test_item_shape_range_and_fields(rows):
    item = FeedbackDataset(rows, resolution=16)[(1, 7)]
    assert item["pixel_values"].shape == (3, 16, 16) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert (item["prompt"], item["desirable"], item["row"], item["draw_id"]) == ("tall", False, 1, 7)


def test_colour_values_map_to_minus_one_and_one(png_bytes):
    row = FeedbackRow(png_bytes((255, 0, 128), size=(4, 4)), "p", True, "x:1")
    pixels = FeedbackDataset([row], resolution=4)[0]["pixel_values"]
    assert torch.allclose(pixels[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)


def test_plain_int_index_is_draw_zero(rows):
    dataset = FeedbackDataset(rows, resolution=8, random_flip=True, center_crop=False)
    assert torch.equal(dataset[0]["pixel_values"], dataset[(0, 0)]["pixel_values"])
    assert len(dataset) == 2
    with pytest.raises(IndexError):
        dataset[2]


def test_same_draw_same_item_different_draws_differ(rows):
    dataset = FeedbackDataset(rows, resolution=16, center_crop=False, random_flip=True, caption_dropout=0.5, seed=3)
    again = FeedbackDataset(rows, resolution=16, center_crop=False, random_flip=True, caption_dropout=0.5, seed=3)
    items = [dataset[(0, k)] for k in range(40)]
    for k in (0, 5, 39):
        assert torch.equal(items[k]["pixel_values"], again[(0, k)]["pixel_values"])
        assert items[k]["prompt"] == again[(0, k)]["prompt"]
    assert len({tuple(i["pixel_values"].flatten().tolist()) for i in items}) > 5


def test_flip_happens_about_half_the_time_and_mirrors(rows):
    dataset = FeedbackDataset(rows[:1], resolution=16, center_crop=True, random_flip=True)
    plain = FeedbackDataset(rows[:1], resolution=16, center_crop=True, random_flip=False)[0]["pixel_values"]
    flips = 0
    for k in range(400):
        pixels = dataset[(0, k)]["pixel_values"]
        if torch.equal(pixels, plain.flip(-1)):
            flips += 1
        else:
            assert torch.equal(pixels, plain)
    assert 140 < flips < 260


def test_center_crop_is_centred_and_random_crop_moves(rows):
    image = resize_shorter_side(Image.open(io.BytesIO(rows[0].image)), 12)
    assert image.size == (20, 12)
    assert crop_square(image, 12, center=True).size == (12, 12)
    offsets = {crop_square(image, 12, center=False, crop_x=u).getpixel((0, 0)) for u in (0.0, 0.3, 0.6, 0.999)}
    assert len(offsets) == 4
    assert crop_square(image, 12, center=False, crop_x=0.999).getpixel((11, 0)) == image.getpixel((19, 0))


def test_upscale_small_images(rows):
    assert FeedbackDataset(rows, resolution=64)[(1, 3)]["pixel_values"].shape == (3, 64, 64)


def test_caption_dropout_rate_and_default_off(rows):
    dropped = sum(FeedbackDataset(rows, resolution=4, caption_dropout=0.2)[(0, k)]["prompt"] == "" for k in range(1000))
    assert 150 < dropped < 250
    assert all(FeedbackDataset(rows, resolution=4)[(0, k)]["prompt"] for k in range(50))
    assert all(FeedbackDataset(rows, resolution=4, caption_dropout=1.0)[(0, k)]["prompt"] == "" for k in range(50))


def test_dropout_setting_does_not_change_flips():
    a = [draw_choices(0, k, 0.0).flip for k in range(100)]
    b = [draw_choices(0, k, 0.9).flip for k in range(100)]
    assert a == b


def test_broken_image_raises_feedback_error_naming_the_row():
    dataset = FeedbackDataset([FeedbackRow(b"nope", "p", True, "f.parquet[3]")], resolution=8)
    with pytest.raises(FeedbackError, match=r"f.parquet\[3\]"):
        dataset[0]


@pytest.mark.parametrize("kwargs", [dict(resolution=0), dict(resolution=8, caption_dropout=1.5)])
def test_bad_settings(rows, kwargs):
    with pytest.raises(ValueError):
        FeedbackDataset(rows, **kwargs)


def test_collate_with_the_sampler_and_workers(rows):
    dataset = FeedbackDataset(rows, resolution=8, center_crop=False, caption_dropout=0.3, seed=1)
    sampler = DesirableSampler([r.desirable for r in rows], 0.5, seed=5, batch_size=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, sampler=sampler, collate_fn=collate, num_workers=2)
    batches = list(itertools.islice(iter(loader), 2))
    batch = batches[1]
    assert batch.pixels.shape == (3, 3, 8, 8)
    assert batch.desirable.dtype == torch.bool and batch.rows.dtype == torch.long
    assert batch.draw_ids.tolist() == [3, 4, 5]
    assert batch.desirable.tolist() == [rows[i].desirable for i in batch.rows.tolist()]
    expected = collate([dataset[d] for d in sampler.draws_for_step(1)])
    assert torch.equal(batch.pixels, expected.pixels) and batch.prompts == expected.prompts


def test_collate_empty_batch():
    with pytest.raises(ValueError):
        collate([])
