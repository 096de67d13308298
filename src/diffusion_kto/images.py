"""Pictures for reports and logs: labelled image grids, thumbnails and PNG data URIs.

Plain PIL, no models and no matplotlib: ``sampling`` (the validation grid), ``evaluation`` (report grids and the
self-contained HTML) and the apps draw their grids here."""
from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def _font():
    """Pillow's built-in small font (shipped with Pillow: no font files, no system fonts)."""
    return ImageFont.load_default()


def _text_size(text: str, font) -> tuple[int, int]:
    """Width and height of text drawn with font."""
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _fit(text: str, width: int, font) -> str:
    """text shortened with '...' so that it fits in width pixels."""
    if _text_size(text, font)[0] <= width:
        return text
    while text and _text_size(text + "...", font)[0] > width:
        text = text[:-1]
    return text + "..."


def grid_geometry(rows: Mapping[str, Sequence[Image.Image]], col_labels: Sequence[str] | None,
                  scale: int, pad: int = 4) -> dict[str, int]:
    """Cell, label and canvas sizes of image_grid, in pixels."""
    images = [im for ims in rows.values() for im in ims]
    cell_w = max((im.width for im in images), default=1) * scale
    cell_h = max((im.height for im in images), default=1) * scale
    n_cols = max((len(ims) for ims in rows.values()), default=0)
    font = _font()
    label_w = max((_text_size(str(r), font)[0] for r in rows), default=0) + 2 * pad
    header_h = (_text_size("Ag", font)[1] + 2 * pad) if col_labels else 0
    return {"cell_w": cell_w, "cell_h": cell_h, "n_cols": n_cols, "n_rows": len(rows), "pad": pad,
            "label_w": label_w, "header_h": header_h,
            "width": label_w + n_cols * (cell_w + pad) + pad,
            "height": header_h + len(rows) * (cell_h + pad) + pad}


def image_grid(rows: Mapping[str, Sequence[Image.Image]], col_labels: Sequence[str] | None = None,
               scale: int = 4, pad: int = 4) -> Image.Image:
    """Models as labelled rows, prompts/seeds as columns labelled above; images upscaled ×scale (NEAREST)."""
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    g = grid_geometry(rows, col_labels, int(scale), pad)
    canvas = Image.new("RGB", (g["width"], g["height"]), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    for j, label in enumerate(list(col_labels or [])[: g["n_cols"]]):
        x = g["label_w"] + j * (g["cell_w"] + pad)
        draw.text((x, pad), _fit(str(label), g["cell_w"], font), fill=INK, font=font)
    for i, (name, images) in enumerate(rows.items()):
        y = g["header_h"] + i * (g["cell_h"] + pad)
        text_h = _text_size(str(name), font)[1]
        draw.text((pad, y + (g["cell_h"] - text_h) // 2), str(name), fill=INK, font=font)
        for j, im in enumerate(images):
            big = im.convert("RGB").resize((im.width * int(scale), im.height * int(scale)), Image.NEAREST)
            x = g["label_w"] + j * (g["cell_w"] + pad)
            canvas.paste(big, (x + (g["cell_w"] - big.width) // 2, y + (g["cell_h"] - big.height) // 2))
    return canvas


def thumbnail(image: Image.Image, side: int = 192) -> Image.Image:
    """image shrunk to at most side pixels (large model outputs), unchanged when already small."""
    if max(image.size) <= side:
        return image
    im = image.copy()
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return im


def png_data_uri(image: Image.Image) -> str:
    """A PNG image as a base64 data URI for a self-contained HTML page."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def line_plot(series: Mapping[str, Sequence[tuple[float, float]]], *, title: str = "", x_label: str = "",
              y_label: str = "", y_range: tuple[float, float] | None = None, size: tuple[int, int] = (560, 340),
              lines: bool = True, x_range: tuple[float, float] | None = None, legend_width: int = 150) -> Image.Image:
    """A small chart of named (x, y) point series (points joined by lines unless ``lines=False``), axes with 5 ticks
    each and a legend; plain PIL, for reports that must not need matplotlib. Past the palette's six colours the
    series' points and legend swatches are hollow, so no two series look alike."""
    points = [p for pts in series.values() for p in pts]
    xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
    x0, x1 = x_range or (min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1)
    y0, y1 = y_range or (min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1)
    width, height = size
    left, right, top, bottom = 56, legend_width, 28, 40
    canvas = Image.new("RGB", size, BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font()
    px = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    py = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    draw.rectangle([left, top, width - right, height - bottom], outline=INK)
    for k in range(5):
        xv, yv = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
        draw.line([px(xv), height - bottom, px(xv), height - bottom + 4], fill=INK)
        draw.text((px(xv) - 10, height - bottom + 6), f"{xv:.3g}", fill=INK, font=font)
        draw.line([left - 4, py(yv), left, py(yv)], fill=INK)
        draw.text((4, py(yv) - 6), f"{yv:.3g}", fill=INK, font=font)
    draw.text((left, 6), title, fill=INK, font=font)
    draw.text(((left + width - right) // 2 - 20, height - 16), x_label, fill=INK, font=font)
    draw.text((4, top - 16), y_label, fill=INK, font=font)
    for k, (name, pts) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        fill = None if (k // len(PALETTE)) % 2 else colour  # the second round of colours: hollow markers
        xy = [(px(x), py(y)) for x, y in pts]
        if lines and len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=fill, outline=colour, width=2)
        ly = top + 6 + 16 * k
        draw.rectangle([width - right + 10, ly, width - right + 20, ly + 10], fill=fill, outline=colour, width=2)
        draw.text((width - right + 26, ly), _fit(str(name), right - 30, font), fill=INK, font=font)
    return canvas
