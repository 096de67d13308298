"""Image and caption transforms: resize the shorter side, square crop, horizontal flip, caption dropout.

Every random decision of one draw comes from a generator seeded by (seed, draw_id), so a draw looks the same in
any DataLoader worker, in any process, and after a resume. The decisions are drawn in a fixed order whatever the
settings, so changing e.g. caption_dropout does not change which draws are flipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

_STREAM_TAG = 0x6B746F_7402  # keeps transform randomness apart from the sampler's stream for the same seed


@dataclass(frozen=True)
class DrawChoices:
    """The random decisions for one draw: crop position in [0, 1)², flip, caption dropout."""

    crop_x: float
    crop_y: float
    flip: bool
    drop_caption: bool


def draw_choices(seed: int, draw_id: int, caption_dropout: float) -> DrawChoices:
    """Decisions for draw `draw_id`, determined only by (seed, draw_id); flip with p = 0.5."""
    sequence = np.random.SeedSequence([int(seed) % 2**64, _STREAM_TAG, int(draw_id) % 2**64])
    u = np.random.Generator(np.random.PCG64(sequence)).random(4)
    return DrawChoices(
        crop_x=float(u[0]), crop_y=float(u[1]), flip=bool(u[2] < 0.5), drop_caption=bool(u[3] < caption_dropout)
    )


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is `resolution` (Lanczos down, bicubic up), keeping the aspect ratio."""
    width, height = image.size
    if min(width, height) == resolution:
        return image
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return image.resize(size, method)


def crop_square(
    image: Image.Image, resolution: int, *, center: bool, crop_x: float = 0.5, crop_y: float = 0.5
) -> Image.Image:
    """A resolution × resolution crop: centred, or at the offset given by crop_x, crop_y in [0, 1)."""
    width, height = image.size
    if center:
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        left = min(int(crop_x * (width - resolution + 1)), width - resolution)
        top = min(int(crop_y * (height - resolution + 1)), height - resolution)
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a float (3, H, W) tensor in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def transform_image(
    image: Image.Image, resolution: int, choices: DrawChoices, *, center_crop: bool, random_flip: bool
) -> torch.Tensor:
    """Resize, crop, maybe flip, and convert to a (3, R, R) tensor in [-1, 1]."""
    image = resize_shorter_side(image, resolution)
    image = crop_square(image, resolution, center=center_crop, crop_x=choices.crop_x, crop_y=choices.crop_y)
    if random_flip and choices.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)


def transform_caption(prompt: str, choices: DrawChoices) -> str:
    """The prompt, or "" when this draw drops its caption."""
    return "" if choices.drop_caption else prompt
