"""Hugging Face datasets sources (skipped when the optional `datasets` extra is not installed)."""
from __future__ import annotations

import pytest
from PIL import Image

from diffusion_kto.data import FeedbackError, load_image, read_feedback, validate

datasets = pytest.importorskip("datasets")


def image_dataset(n_liked=2, n_disliked=1):
    """A Dataset with an Image feature holding PIL images, prompts and int labels."""
    colors = [(10 * i, 0, 0) for i in range(n_liked + n_disliked)]
    return datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (6, 6), c) for c in colors],
            "caption": [f"square {i}" for i in range(len(colors))],
            "label": [1] * n_liked + [0] * n_disliked,
        },
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.Value("int64")}),
    )


def test_save_to_disk_folder(tmp_path):
    image_dataset().save_to_disk(str(tmp_path / "saved"))
    rows = read_feedback(tmp_path / "saved", prompt_column="caption")
    assert [(r.prompt, r.desirable) for r in rows] == [("square 0", True), ("square 1", True), ("square 2", False)]
    assert all(isinstance(r.image, bytes) for r in rows)
    assert load_image(rows[2]).getpixel((0, 0)) == (20, 0, 0)
    assert rows[1].where == f"{tmp_path / 'saved'}[1]"
    assert validate(rows, need_both_classes=True).n == 3


def test_dataset_dict_split(tmp_path):
    datasets.DatasetDict({"train": image_dataset(1, 1), "test": image_dataset(3, 0)}).save_to_disk(str(tmp_path / "dd"))
    assert len(read_feedback(tmp_path / "dd", prompt_column="caption")) == 2
    assert len(read_feedback(tmp_path / "dd", prompt_column="caption", split="test")) == 3
    with pytest.raises(FeedbackError, match="no split 'valid'"):
        read_feedback(tmp_path / "dd", prompt_column="caption", split="valid")


def test_missing_column_lists_columns(tmp_path):
    image_dataset().save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(FeedbackError, match=r"no column 'prompt' \(columns present: 'image', 'caption', 'label'\)"):
        read_feedback(tmp_path / "saved")


def test_bad_label_names_the_index(tmp_path):
    ds = image_dataset().cast_column("label", datasets.Value("string"))
    ds = ds.map(lambda ex, i: {"label": "meh" if i == 2 else ex["label"]}, with_indices=True)
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(FeedbackError, match=r"saved\[2\]: column 'label'"):
        read_feedback(tmp_path / "saved", prompt_column="caption")


def test_parquet_written_by_datasets(tmp_path):
    image_dataset().to_parquet(str(tmp_path / "f.parquet"))
    rows = read_feedback(tmp_path / "f.parquet", prompt_column="caption")
    assert len(rows) == 3 and all(isinstance(r.image, bytes) for r in rows)


def test_hub_id_goes_through_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return image_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = read_feedback("someone/feedback", prompt_column="caption")
    assert calls == [("someone/feedback", "train")] and rows[0].where == "someone/feedback[0]"


def test_hub_failure_is_a_feedback_error(monkeypatch):
    def failing(name, split):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(FeedbackError, match="someone/nothing: not a local file or folder"):
        read_feedback("someone/nothing")
