"""Image grids: size and layout, and NEAREST upscaling of every cell."""
import numpy as np
import pytest
from PIL import Image

from diffusion_kto.images import grid_geometry, image_grid


def _tiles(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_grid_size_and_layout():
    tiles = _tiles(3)
    grid = image_grid({"A": tiles, "model B": tiles[:2]}, ["p1", "p2", "p3"], scale=4, pad=4)
    g = grid_geometry({"A": tiles, "model B": tiles[:2]}, ["p1", "p2", "p3"], scale=4, pad=4)
    assert (g["cell_w"], g["cell_h"], g["n_cols"], g["n_rows"]) == (128, 128, 3, 2)
    assert grid.size == (g["label_w"] + 3 * 132 + 4, g["header_h"] + 2 * 132 + 4)
    assert g["header_h"] > 0 and g["label_w"] > 0
    # one more column adds exactly one cell and one pad; no column labels removes the header
    assert image_grid({"A": _tiles(4)}, scale=4).width - image_grid({"A": _tiles(3)}, scale=4).width == 132
    assert grid_geometry({"A": tiles}, None, 4)["header_h"] == 0


def test_grid_upscales_with_nearest():
    tile = _tiles(1)[0]
    grid = image_grid({"A": [tile]}, None, scale=4)
    g = grid_geometry({"A": [tile]}, None, 4)
    x0, y0 = g["label_w"], g["header_h"]
    crop = np.asarray(grid.crop((x0, y0, x0 + 128, y0 + 128)))
    expected = np.asarray(tile).repeat(4, axis=0).repeat(4, axis=1)
    assert np.array_equal(crop, expected)
    with pytest.raises(ValueError):
        image_grid({"A": [tile]}, scale=0)
