"""Image and caption transforms: resize the shorter side, square crop, horizontal flip, caption dropout; the crop's
geometry (original size, crop box), which SDXL conditions on.

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


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to `resolution`, keeping the aspect ratio."""
    if min(width, height) == resolution:
        return width, height
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is `resolution` (Lanczos down, bicubic up), keeping the aspect ratio."""
    size = resized_size(*image.size, resolution)
    if size == image.size:
        return image
    method = Image.Resampling.LANCZOS if resolution < min(image.size) else Image.Resampling.BICUBIC
    return image.resize(size, method)


def crop_offsets(width: int, height: int, resolution: int, *, center: bool, crop_x: float = 0.5,
                 crop_y: float = 0.5) -> tuple[int, int]:
    """(left, top) of a resolution × resolution crop of a width × height image: centred, or at crop_x, crop_y in
    [0, 1)."""
    if center:
        return (width - resolution) // 2, (height - resolution) // 2
    return (min(int(crop_x * (width - resolution + 1)), width - resolution),
            min(int(crop_y * (height - resolution + 1)), height - resolution))


def crop_square(
    image: Image.Image, resolution: int, *, center: bool, crop_x: float = 0.5, crop_y: float = 0.5
) -> Image.Image:
    """A resolution × resolution crop: centred, or at the offset given by crop_x, crop_y in [0, 1)."""
    left, top = crop_offsets(*image.size, resolution, center=center, crop_x=crop_x, crop_y=crop_y)
    return image.crop((left, top, left + resolution, top + resolution))


def crop_geometry(size: tuple[int, int], resolution: int, choices: DrawChoices, *, center_crop: bool,
                  random_flip: bool) -> dict[str, tuple[int, ...]]:
    """What :func:`transform_image` does to an image of ``size`` (width, height): {"original_size": (height, width)
    as read, "crop": (top, left, height, width) of the crop in the resized image} -- SDXL's micro-conditioning
    (original size, crop top-left, target size). A flipped draw is a crop of the mirrored image: left mirrored."""
    width, height = resized_size(*size, resolution)
    left, top = crop_offsets(width, height, resolution, center=center_crop, crop_x=choices.crop_x,
                             crop_y=choices.crop_y)
    if random_flip and choices.flip:
        left = width - left - resolution
    return {"original_size": (size[1], size[0]), "crop": (top, left, resolution, resolution)}


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
