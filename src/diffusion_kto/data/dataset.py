"""The training dataset: feedback rows in, transformed pixels + prompt + desirable flag out.

Keys are the `(row_index, draw_id)` tuples of `DesirableSampler`; all randomness of an item (crop, flip, caption
dropout) comes from (seed, draw_id), so items are deterministic and independent of the DataLoader worker.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial

import torch
import torch.utils.data

from .feedback import load_image
from .rows import FeedbackRow
from .transforms import crop_geometry, draw_choices, transform_caption, transform_image


@dataclass(frozen=True)
class ItemTransform:
    """Turns one feedback row and its draw id into a training item (crop, flip, caption dropout from (seed, draw_id))."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = True
    caption_dropout: float = 0.0  # probability of replacing the prompt by ""
    seed: int = 0

    def __post_init__(self):
        """Refuse settings no transform can use."""
        if int(self.resolution) < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if not (math.isfinite(self.caption_dropout) and 0.0 <= self.caption_dropout <= 1.0):
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")

    def __call__(self, row: FeedbackRow, index: int, draw_id: int,
                 cached: Callable[[bool], dict] | None = None) -> dict:
        """{"pixel_values": (3,R,R), "original_size": (h, w), "crop": (top, left, h, w), "prompt", "desirable",
        "row": index, "draw_id"} for one draw of `row`; with `cached` (flip -> the cache's entry of that variant),
        {"latent_mean", "latent_std"}: (C,h,w) each instead of pixels, and the cached geometry."""
        choices = draw_choices(self.seed, draw_id, self.caption_dropout)
        if cached is not None:
            image = cached(self.random_flip and choices.flip)
        else:
            pil = load_image(row)
            flags = {"center_crop": self.center_crop, "random_flip": self.random_flip}
            image = {"pixel_values": transform_image(pil, int(self.resolution), choices, **flags),
                     **crop_geometry(pil.size, int(self.resolution), choices, **flags)}
        return {
            **image,
            "prompt": transform_caption(row.prompt, choices),
            "desirable": row.desirable,
            "row": index,
            "draw_id": draw_id,
        }


class FeedbackDataset(torch.utils.data.Dataset):
    """Feedback rows as training items: {"pixel_values", "prompt", "desirable", "row", "draw_id"}."""

    def __init__(self, rows: Sequence[FeedbackRow], *, cache=None, **transform):
        """Keep the rows and the `ItemTransform` settings (resolution, center_crop, ..., seed).

        With a :class:`~diffusion_kto.data.cache.LatentCache`, items carry the cached VAE posterior
        ("latent_mean", "latent_std") of the draw's flip variant instead of "pixel_values"."""
        self.rows = list(rows)
        self.transform = ItemTransform(**transform)
        self.cache = cache
        self.keys = cache.image_keys(self.rows) if cache is not None else None

    def __len__(self) -> int:
        """Number of feedback rows."""
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        """The item for (row_index, draw_id) from the sampler, or for a plain row index (draw_id 0)."""
        index, draw_id = _split_key(key)
        if not 0 <= index < len(self.rows):
            raise IndexError(f"row index {index} out of range for {len(self.rows)} feedback rows")
        cached = None if self.cache is None else partial(self.cache.item, self.keys[index])
        return self.transform(self.rows[index], index, draw_id, cached)


def _split_key(key: tuple[int, int] | int) -> tuple[int, int]:
    """(row_index, draw_id) from a sampler key or a plain index."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"expected a (row_index, draw_id) key, got {key!r}")
        return int(key[0]), int(key[1])
    if isinstance(key, torch.Tensor):
        key = key.item()
    return int(key), 0


@dataclass
class Batch:
    """One micro-batch of feedback draws; for pairs (loss.name=dpo), every preferred image first, then their rejected
    partners in the same order. Images come as pixels, or as the cached VAE posterior (``data.cache``)."""

    prompts: list[str]
    desirable: torch.Tensor  # (B,) bool: liked
    rows: torch.Tensor  # (B,) int64: the feedback row of each sample
    draw_ids: torch.Tensor  # (B,) int64: the draw each sample's randomness (crop, flip, dropout, noise, t) comes from
    pixels: torch.Tensor | None = None  # (B, 3, R, R) in [-1, 1]
    latent_mean: torch.Tensor | None = None  # (B, C, h, w) of the cached VAE posterior
    latent_std: torch.Tensor | None = None  # (B, C, h, w)
    original_size: torch.Tensor | None = None  # (B, 2) int64: (height, width) of each image as read
    crop: torch.Tensor | None = None  # (B, 4) int64: (top, left, height, width) of its crop in the resized image
    stream: tuple[int, ...] | None = None  # data.streaming: (reader, readers, epoch, shard, row, skipped) after it

    def __len__(self) -> int:
        """The number of samples (images)."""
        return len(self.prompts)

    def with_prompts(self, prompts: list[str]) -> Batch:
        """The same batch with other prompts (e.g. an objective's conditioning on the label)."""
        return replace(self, prompts=list(prompts))

    def pin_memory(self) -> Batch:
        """Tensors in pinned memory (the DataLoader calls this with pin_memory=True)."""
        pinned = {f.name: v.pin_memory() for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}
        return replace(self, **pinned)


def collate(batch: Sequence[dict]) -> Batch:
    """Stack items into a :class:`Batch`: pixels (B,3,R,R) or the cached latent mean / std (B,C,h,w), prompts,
    desirable (B,) bool, rows and draw ids (B,) int64, the crops' geometry (B,2) and (B,4) int64 when recorded."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    images = {k: torch.stack([item[k] for item in batch]) for k in ("pixel_values", "latent_mean", "latent_std")
              if k in batch[0]}
    return Batch(
        prompts=[item["prompt"] for item in batch],
        desirable=torch.tensor([bool(item["desirable"]) for item in batch], dtype=torch.bool),
        rows=torch.tensor([int(item["row"]) for item in batch], dtype=torch.long),
        draw_ids=torch.tensor([int(item.get("draw_id", 0)) for item in batch], dtype=torch.long),
        pixels=images.get("pixel_values"), latent_mean=images.get("latent_mean"), latent_std=images.get("latent_std"),
        **{k: torch.tensor([list(item[k]) for item in batch], dtype=torch.long) for k in ("original_size", "crop")
           if all(k in item for item in batch)},
    )
