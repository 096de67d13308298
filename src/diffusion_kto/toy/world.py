"""The toy "shapes world": a prompt grammar, a 32x32 renderer, and a flawed-image corpus.

Prompts name a colour, a shape and optionally a background ("a red circle", "a blue square on black").
Ground truth is one centred, sharp shape of the prompted colour on a plain background. A share of the corpus
carries flaws that people dislike (wrong colour, off-centre, blurred, noisy, a stray second shape); flaws are
drawn independently of the prompt, so a model pretrained on the corpus learns them as random modes that
feedback can later train away.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32  # rendered images are SIZE x SIZE RGB
SUPERSAMPLE = 4  # shapes are drawn at SIZE * SUPERSAMPLE and box-filtered down (antialiasing)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 200, 30),
    "green": (40, 170, 60),
    "cyan": (30, 190, 200),
    "blue": (40, 70, 220),
    "magenta": (200, 50, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
DEFAULT_BACKGROUND = "white"  # written without an "on ..." phrase in canonical prompts
FLAWS: tuple[str, ...] = ("wrong_colour", "off_centre", "blur", "noise", "clutter")

HALF_EXTENT = (7.0, 9.0)  # half the side of a shape's bounding box, pixels
CENTRE_JITTER = 1.0  # clean shapes sit within +-1 px of the image centre
OFF_CENTRE_SHIFT = (6.0, 8.0)  # the off_centre flaw moves the shape this far, pixels
BLUR_RADIUS = (1.3, 1.8)  # Gaussian blur radius of the blur flaw, pixels
NOISE_SIGMA = (0.09, 0.14)  # grain std of the noise flaw, fraction of the 0..255 range
GRAIN_CELL = 4  # the noise flaw's grain is constant over 4x4-pixel cells
CLUTTER_HALF_EXTENT = (3.0, 4.0)  # the stray shape of the clutter flaw is small and sits in a corner


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: a colour, a shape and a background."""

    colour: str
    shape: str
    background: str = DEFAULT_BACKGROUND

    @property
    def prompt(self) -> str:
        """The canonical prompt text for this spec."""
        text = f"a {self.colour} {self.shape}"
        return text if self.background == DEFAULT_BACKGROUND else f"{text} on {self.background}"


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the toy text encoder's vocabulary)."""
    return ["a", "on", *COLOURS, *SHAPES, *BACKGROUNDS]


def parse(prompt: str) -> Spec:
    """Read "a <colour> <shape> [on <background>]" into a Spec; ValueError if it is not in the grammar."""
    words = prompt.strip().lower().split()
    if words[:1] == ["a"]:
        words = words[1:]
    background = DEFAULT_BACKGROUND
    if len(words) == 4 and words[2] == "on":
        background = words[3]
        words = words[:2]
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES or background not in BACKGROUNDS:
        raise ValueError(
            f"prompt {prompt!r} is not in the toy grammar 'a <colour> <shape> [on <background>]' "
            f"(colours {list(COLOURS)}, shapes {list(SHAPES)}, backgrounds {list(BACKGROUNDS)})"
        )
    return Spec(words[0], words[1], background)


def all_specs() -> list[Spec]:
    """Every spec of the grammar, in a fixed order (colour, shape, background)."""
    return [Spec(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def is_held_out(spec: Spec) -> bool:
    """Deterministic held-out rule: one colour per (shape, background) pair, so every colour and shape
    appears in training but some of their combinations with a background do not."""
    c, s, b = list(COLOURS).index(spec.colour), SHAPES.index(spec.shape), list(BACKGROUNDS).index(spec.background)
    return (c + 2 * s + b) % len(COLOURS) == 0


def train_prompts() -> list[str]:
    """Prompts the corpus and the feedback runs use."""
    return [s.prompt for s in all_specs() if not is_held_out(s)]


def eval_prompts() -> list[str]:
    """Held-out prompts, disjoint from train_prompts(), for evaluation."""
    return [s.prompt for s in all_specs() if is_held_out(s)]


def all_prompts() -> list[str]:
    """Every canonical prompt of the grammar."""
    return [s.prompt for s in all_specs()]


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A numpy Generator from a Generator, a seed, or None (seed 0: rendering is deterministic by default)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """The palette colour with a small per-channel jitter that keeps its hue."""
    return tuple(int(np.clip(v + rng.uniform(-12, 12), 0, 255)) for v in rgb)


def _polygon(shape: str, cx: float, cy: float, h: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape in supersampled pixels (None for the circle)."""
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], h: float, fill) -> None:
    """Draw one shape, centre and half-extent given in output pixels, onto a supersampled canvas."""
    k = SUPERSAMPLE
    cx, cy, hk = centre[0] * k, centre[1] * k, h * k
    points = _polygon(shape, cx, cy, hk)
    if points is None:
        draw.ellipse([cx - hk, cy - hk, cx + hk, cy + hk], fill=fill)
    else:
        draw.polygon(points, fill=fill)


def _clutter(draw: ImageDraw.ImageDraw, main_colour: str, rng: np.random.Generator) -> None:
    """A small stray shape of another colour in a random corner."""
    colour = str(rng.choice([c for c in COLOURS if c != main_colour]))
    shape = str(rng.choice(SHAPES))
    h = rng.uniform(*CLUTTER_HALF_EXTENT)
    corner = rng.integers(0, 2, size=2)
    centre = tuple(float(rng.uniform(3.5, 5.0) if side == 0 else SIZE - rng.uniform(3.5, 5.0)) for side in corner)
    _draw_shape(draw, shape, centre, h, _jitter_colour(COLOURS[colour], rng))


def _grain(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Add blocky Gaussian grain, constant over GRAIN_CELL x GRAIN_CELL pixels (coarse enough for a factor-2
    VAE to reproduce, so a pretrained model actually draws noisy images)."""
    sigma = rng.uniform(*NOISE_SIGMA) * 255.0
    cells = SIZE // GRAIN_CELL
    grain = rng.normal(0.0, sigma, size=(cells, cells, 3))
    grain = grain.repeat(GRAIN_CELL, axis=0).repeat(GRAIN_CELL, axis=1)  # (8, 8, 3) -> (32, 32, 3)
    pixels = np.asarray(image, dtype=np.float32) + grain
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def render(
    prompt_or_spec: str | Spec,
    flaws: tuple[str, ...] | list[str] = (),
    rng: np.random.Generator | int | None = None,
) -> Image.Image:
    """Draw a 32x32 RGB image of the prompt, with the given flaws (names from FLAWS); deterministic given rng."""
    spec = parse(prompt_or_spec) if isinstance(prompt_or_spec, str) else prompt_or_spec
    unknown = set(flaws) - set(FLAWS)
    if unknown:
        raise ValueError(f"unknown flaws {sorted(unknown)}; expected some of {list(FLAWS)}")
    rng = _as_rng(rng)
    canvas = Image.new("RGB", (SIZE * SUPERSAMPLE, SIZE * SUPERSAMPLE), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(canvas)
    colour = spec.colour
    if "wrong_colour" in flaws:
        colour = str(rng.choice([c for c in COLOURS if c != spec.colour]))
    centre = SIZE / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)
    if "off_centre" in flaws:
        angle = rng.uniform(0, 2 * np.pi)
        centre = centre + rng.uniform(*OFF_CENTRE_SHIFT) * np.array([np.cos(angle), np.sin(angle)])
    _draw_shape(draw, spec.shape, (float(centre[0]), float(centre[1])), rng.uniform(*HALF_EXTENT),
                _jitter_colour(COLOURS[colour], rng))
    if "clutter" in flaws:
        _clutter(draw, colour, rng)
    image = canvas.resize((SIZE, SIZE), Image.Resampling.BOX)  # (128, 128) -> (32, 32), area-averaged
    if "blur" in flaws:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*BLUR_RADIUS)))
    if "noise" in flaws:
        image = _grain(image, rng)
    return image


def sample_flaws(n: int, rng: np.random.Generator, flaw_rate: float = 0.4) -> list[tuple[str, ...]]:
    """Per image, no flaw with probability 1 - flaw_rate, else one flaw drawn uniformly from FLAWS."""
    flawed = rng.random(n) < flaw_rate
    kinds = rng.integers(0, len(FLAWS), size=n)
    return [(FLAWS[k],) if f else () for f, k in zip(flawed, kinds)]


def make_corpus(
    n: int,
    seed: int = 0,
    flaw_rate: float = 0.4,
    prompts: list[str] | None = None,
) -> tuple[list[Image.Image], list[str]]:
    """n rendered images and their prompts (uniform over train_prompts() by default); about flaw_rate of them
    carry one flaw, chosen independently of the prompt. Deterministic given seed."""
    rng = np.random.default_rng(seed)
    prompts = train_prompts() if prompts is None else list(prompts)
    chosen = [prompts[i] for i in rng.integers(0, len(prompts), size=n)]
    flaws = sample_flaws(n, rng, flaw_rate)
    images = [render(p, f, rng) for p, f in zip(chosen, flaws)]
    return images, chosen
