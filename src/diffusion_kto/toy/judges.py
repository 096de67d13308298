"""Judges for the toy world: score images against prompts from their pixels, and turn scores into likes.

A judge is any callable ``judge(images, prompts) -> np.ndarray`` of scores in [0, 1], one per image, where
images are PIL images (or an (N, H, W, 3) uint8 array) and prompts are toy-grammar strings. Built-ins:

- ``fidelity``: the image shows the prompted colour, shape and background.
- ``aesthetic``: the shape is centred, its edges are sharp, and the background around it is clean.
- ``preference`` (the demo's default): fidelity x aesthetic.

``JUDGES`` maps their names (and those of the sub-scores) to them; it is registered as the ``toy`` judge provider
(entry point group ``diffusion_kto.scorers``), so that ``toy:preference`` names a judge for
``diffusion_kto.evaluation.judges.load_judge`` and ``dkto eval --metrics``.
All measures are vectorised numpy over the batch (many thousands of images per second).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image

from diffusion_kto.toy import world

Judge = Callable[[Sequence[Image.Image], Sequence[str]], np.ndarray]

FG_DISTANCE = 0.2  # a pixel is foreground when some channel differs from the background by more than this
CHROMA_MIN = 0.2  # ... and chromatic when max(rgb) - min(rgb) exceeds this
HUE_TOLERANCE = 30.0  # degrees either side of the prompted hue that count as "the prompted colour"
MIN_SHAPE_PIXELS = 40.0  # a 32x32 shape of the smallest size covers about 100 pixels
FRAME = 5  # the outer ring this many pixels wide must be plain background in a clean image
SHAPE_SIGMA = 0.07  # softness of the shape templates in (fill ratio, centroid offset) space


def to_array(images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
    """Images as an (N, 32, 32, 3) float32 array in [0, 1]; other sizes are resized to 32x32."""
    if isinstance(images, np.ndarray):
        array = images.astype(np.float32)
        return array / 255.0 if images.dtype == np.uint8 else array
    side = world.SIZE
    arrays = [
        np.asarray(im.convert("RGB") if im.size == (side, side) else
                   im.convert("RGB").resize((side, side), Image.Resampling.BOX), dtype=np.float32)
        for im in images
    ]
    return np.stack(arrays) / 255.0 if arrays else np.zeros((0, side, side, 3), np.float32)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of (..., 3) RGB in [0, 1] -> (...)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)) % 360.0


def _hue_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angular distance between hues in degrees, in [0, 180]."""
    d = np.abs(a - b) % 360.0
    return np.minimum(d, 360.0 - d)


PALETTE_HUES = {name: float(_hue(np.array(rgb, np.float32) / 255.0)) for name, rgb in world.COLOURS.items()}


def _border_background(x: np.ndarray) -> np.ndarray:
    """Background colour estimated as the median of the outermost pixel ring: (N, H, W, 3) -> (N, 3)."""
    ring = np.concatenate([x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)  # (N, 4H - 4, 3)
    return np.median(ring, axis=1)


def _prompt_specs(prompts: Sequence[str], n: int) -> list[world.Spec]:
    """Parse one prompt per image; ValueError naming the prompt when it is not in the toy grammar."""
    if len(prompts) != n:
        raise ValueError(f"got {n} images but {len(prompts)} prompts; a judge needs one prompt per image")
    return [world.parse(p) for p in prompts]


def _robust_extent(mask: np.ndarray, axis: int, trim: float = 0.02) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first, last, centroid) pixel index of the mask's mass along rows (axis=1) or columns (axis=2),
    trimming `trim` of the mass at each end so stray pixels do not stretch the box: (N, H, W) -> 3 x (N,)."""
    profile = mask.sum(axis=3 - axis, dtype=np.float32)  # (N, L)
    total = np.maximum(profile.sum(axis=1, keepdims=True), 1.0)
    cum = np.cumsum(profile, axis=1) / total
    first = np.argmax(cum > trim, axis=1)
    last = np.argmax(cum >= 1.0 - trim, axis=1)
    centroid = (profile * np.arange(profile.shape[1])).sum(axis=1) / total[:, 0]
    return first, last, centroid


def _shape_features(mask: np.ndarray) -> np.ndarray:
    """(fill ratio of the robust bounding box, centroid offset below the box centre / box height): (N, 2)."""
    y0, y1, cy = _robust_extent(mask, axis=1)
    x0, x1, _ = _robust_extent(mask, axis=2)
    height, width = (y1 - y0 + 1).astype(np.float32), (x1 - x0 + 1).astype(np.float32)
    fill = mask.sum(axis=(1, 2)) / (height * width)
    offset = (cy - (y0 + y1) / 2.0) / height
    return np.stack([fill, offset], axis=1)


class _Analysis:
    """Pixel measurements shared by the sub-scores of one batch, computed once and on demand."""

    def __init__(self, images, prompts: Sequence[str] | None = None):
        self.x = to_array(images)  # (N, H, W, 3)
        self.specs = None if prompts is None else _prompt_specs(prompts, len(self.x))
        self.bg = _border_background(self.x)  # (N, 3)
        self.dist = np.abs(self.x - self.bg[:, None, None, :]).max(axis=-1)  # (N, H, W)
        self.foreground = self.dist > FG_DISTANCE  # (N, H, W)
        self._matched = None

    def need_specs(self, what: str) -> list[world.Spec]:
        """The parsed prompts; ValueError when this measure needs prompts and none were given."""
        if self.specs is None:
            raise ValueError(f"the {what} score needs the prompts")
        return self.specs

    @property
    def chromatic(self) -> np.ndarray:
        """Foreground pixels with a clear hue: (N, H, W) bool."""
        return self.foreground & (self.x.max(axis=-1) - self.x.min(axis=-1) > CHROMA_MIN)

    @property
    def matched(self) -> np.ndarray:
        """Chromatic pixels within HUE_TOLERANCE of the prompted colour's hue: (N, H, W) bool."""
        if self._matched is None:
            wanted = np.array([PALETTE_HUES[s.colour] for s in self.need_specs("colour")], np.float32)
            near = _hue_distance(_hue(self.x), wanted[:, None, None]) < HUE_TOLERANCE
            self._matched = self.chromatic & near
        return self._matched


def _colour(a: _Analysis) -> np.ndarray:
    """Share of the chromatic foreground in the prompted hue, times enough of it to be a shape: (N,)."""
    n_matched = a.matched.sum(axis=(1, 2), dtype=np.float32)
    purity = n_matched / np.maximum(a.chromatic.sum(axis=(1, 2)), 1)
    return purity * np.clip(n_matched / MIN_SHAPE_PIXELS, 0.0, 1.0)


def _shape(a: _Analysis) -> np.ndarray:
    """Probability of the prompted shape among the shape templates, from the prompted-hue pixels: (N,)."""
    features = _shape_features(a.matched)  # (N, 2)
    d2 = ((features[:, None, :] - SHAPE_TEMPLATES[None, :, :]) ** 2).sum(axis=-1)  # (N, S)
    logits = -d2 / (2 * SHAPE_SIGMA**2)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    wanted = np.array([world.SHAPES.index(s.shape) for s in a.need_specs("shape")])
    return probs[np.arange(len(wanted)), wanted]


def _background(a: _Analysis) -> np.ndarray:
    """1 when the border colour is the prompted background, falling to 0 as it departs by 0.15..0.3: (N,)."""
    wanted = np.array([world.BACKGROUNDS[s.background] for s in a.need_specs("background")], np.float32) / 255.0
    off = np.abs(a.bg - wanted).max(axis=1)  # (N,)
    return np.clip(1.0 - (off - 0.15) / 0.15, 0.0, 1.0)


def _centring(a: _Analysis) -> np.ndarray:
    """1 when the foreground's bounding-box centre is within 2 px of the image centre, 0 beyond 5 px: (N,)."""
    y0, y1, _ = _robust_extent(a.foreground, axis=1)
    x0, x1, _ = _robust_extent(a.foreground, axis=2)
    middle = (a.x.shape[1] - 1) / 2.0
    off = np.hypot((y0 + y1) / 2.0 - middle, (x0 + x1) / 2.0 - middle)
    return np.clip(1.0 - (off - 2.0) / 3.0, 0.0, 1.0)


def _sharpness(a: _Analysis, top_k: int = 12) -> np.ndarray:
    """Steepest edges relative to the image's contrast: a blurred edge spreads over pixels and loses steepness.
    1 at a relative step >= 0.6, 0 at <= 0.4 (clean renders: ~0.9; blurred: ~0.25; a trained toy VAE keeps
    clean edges above ~0.65): (N,)."""
    n = len(a.x)
    steps = np.concatenate([np.abs(np.diff(a.dist, axis=1)).reshape(n, -1),
                            np.abs(np.diff(a.dist, axis=2)).reshape(n, -1)], axis=1)  # (N, 2 H (W - 1))
    steepest = -np.partition(-steps, top_k, axis=1)[:, :top_k].mean(axis=1)
    flat = a.dist.reshape(n, -1)
    kth = int(0.95 * flat.shape[1])
    contrast = np.maximum(np.partition(flat, kth, axis=1)[:, kth], 0.1)
    return np.clip((steepest / contrast - 0.4) / 0.2, 0.0, 1.0)


def _clean(a: _Analysis) -> np.ndarray:
    """1 when the outer FRAME-pixel ring is plain background: few foreground pixels (<= 0.5 %, none left at
    2.5 %) and little grain (mean deviation <= 0.015, none left at 0.05): (N,)."""
    inner = np.zeros(a.dist.shape[1:], bool)
    inner[FRAME:-FRAME, FRAME:-FRAME] = True
    stray = a.foreground[:, ~inner].mean(axis=1)
    grain = a.dist[:, ~inner].mean(axis=1)
    return np.clip(1.0 - (stray - 0.005) / 0.02, 0.0, 1.0) * np.clip(1.0 - (grain - 0.015) / 0.035, 0.0, 1.0)


def _shape_templates() -> np.ndarray:
    """Shape features of clean reference renders, one row per shape in world.SHAPES: (S, 2)."""
    prompts = [world.Spec("red", shape).prompt for shape in world.SHAPES]
    a = _Analysis([world.render(p, rng=0) for p in prompts], prompts)
    return _shape_features(a.matched)


SHAPE_TEMPLATES = _shape_templates()


def colour_score(images, prompts) -> np.ndarray:
    """Share of the foreground in the prompted colour (and enough of it): (N,) in [0, 1]."""
    return _colour(_Analysis(images, prompts))


def shape_score(images, prompts) -> np.ndarray:
    """Probability that the prompted-colour pixels form the prompted shape: (N,) in [0, 1]."""
    return _shape(_Analysis(images, prompts))


def background_score(images, prompts) -> np.ndarray:
    """Does the border show the prompted background colour: (N,) in [0, 1]."""
    return _background(_Analysis(images, prompts))


def centring_score(images, prompts=None) -> np.ndarray:
    """Is the foreground centred: (N,) in [0, 1]; ignores the prompts."""
    return _centring(_Analysis(images))


def sharpness_score(images, prompts=None) -> np.ndarray:
    """Are the edges sharp (not blurred): (N,) in [0, 1]; ignores the prompts."""
    return _sharpness(_Analysis(images))


def clean_score(images, prompts=None) -> np.ndarray:
    """Is the background around the shape plain (no grain, no stray shapes): (N,) in [0, 1]; ignores the prompts."""
    return _clean(_Analysis(images))


def _fidelity(a: _Analysis) -> np.ndarray:
    """colour x shape x background."""
    return _colour(a) * _shape(a) * _background(a)


def _aesthetic(a: _Analysis) -> np.ndarray:
    """centring x sharpness x clean background."""
    return _centring(a) * _sharpness(a) * _clean(a)


def fidelity(images, prompts) -> np.ndarray:
    """Does the image show the prompted colour, shape and background? colour x shape x background, (N,)."""
    return _fidelity(_Analysis(images, prompts))


def aesthetic(images, prompts=None) -> np.ndarray:
    """Is it centred, sharp and clean? centring x sharpness x clean background, (N,); ignores the prompts."""
    return _aesthetic(_Analysis(images))


def preference(images, prompts) -> np.ndarray:
    """The demo's default judge: fidelity x aesthetic, (N,) in [0, 1]."""
    a = _Analysis(images, prompts)
    return _fidelity(a) * _aesthetic(a)


JUDGES: dict[str, Judge] = {
    "preference": preference,
    "fidelity": fidelity,
    "aesthetic": aesthetic,
    "colour": colour_score,
    "shape": shape_score,
    "centring": centring_score,
    "sharpness": sharpness_score,
    "clean": clean_score,
}
DEFAULT_JUDGE = "preference"


def label(
    scores: np.ndarray,
    threshold: float = 0.5,
    flip_prob: float = 0.0,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Likes (True) where score >= threshold, each label flipped with probability flip_prob (label noise): (N,) bool."""
    liked = np.asarray(scores) >= threshold
    if flip_prob <= 0.0:
        return liked
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return liked ^ (rng.random(liked.shape) < flip_prob)
