"""The page's heatmap functions (web/heatmap.js, run in Node) against pneumoscan.explain: the
peak of a map on the hand tables of tests/test_explain.py and on random grids, and the overlay's
colours, opacity and stretch. The maps themselves are compared in the browser (tests/test_web.py)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from conftest import needs_node
from pneumoscan.explain import heatmap_peak
from test_explain import PEAK_CASES

pytestmark = needs_node


def _peak(units, grid: np.ndarray) -> list[float]:
    grid = np.asarray(grid, np.float64)
    answer = units.call(
        "heatmapPeak", values=grid.ravel().tolist(), height=grid.shape[0], width=grid.shape[1]
    )
    assert "error" not in answer, answer
    return answer["peak"]


@pytest.mark.parametrize("name, grid, expected", PEAK_CASES, ids=[c[0] for c in PEAK_CASES])
def test_peak_table(page_units, name, grid, expected):
    assert _peak(page_units, grid) == pytest.approx(expected, abs=2e-3)
    assert _peak(page_units, grid) == pytest.approx(heatmap_peak(grid), abs=1e-12)


def test_peak_of_random_maps_is_pythons(page_units):
    """Shapes from 1 x 1 to 12 x 12, signed and rounded values (ties), a few flat maps."""
    rng = np.random.default_rng(11)
    for k in range(60):
        shape = tuple(rng.integers(1, 13, 2))
        grid = rng.normal(0, 3, shape)
        if k % 3 == 1:
            grid = np.round(grid)  # many equal cells, some exactly at half the maximum
        if k % 10 == 0:
            grid = np.full(shape, grid.flat[0])
        assert _peak(page_units, grid) == pytest.approx(heatmap_peak(grid), abs=1e-12), grid


def _rgba(units, grid: np.ndarray, width: int, height: int) -> np.ndarray:
    answer = units.call(
        "heatmapRgba",
        values=np.asarray(grid, np.float64).ravel().tolist(),
        height=grid.shape[0],
        width=grid.shape[1],
        outWidth=width,
        outHeight=height,
    )
    assert "error" not in answer, answer
    return np.frombuffer(base64.b64decode(answer["rgba"]), np.uint8).reshape(height, width, 4)


def test_overlay_colours_opacity_and_stretch(page_units):
    """A 3 x 3 map with one hot cell, stretched to 93 x 63 (cells of 31 x 21 pixels): inferno's
    brightest colour at alpha 0.6 at that cell's centre, transparent where the map is at its
    minimum, bilinear between cell centres."""
    grid = np.zeros((3, 3))
    grid[0, 2] = 5.0
    rgba = _rgba(page_units, grid - 2.0, 93, 63)  # less its minimum: the offset does not matter
    assert tuple(rgba[10, 77]) == (252, 255, 164, 153)  # cell (0, 2)'s centre: inferno(1), 0.6
    assert rgba[52, 15, 3] == 0 and rgba[31, 46, 3] == 0 and rgba[10, 15, 3] == 0  # at the minimum
    t = (61.5 - 46.5) / 31  # pixel 61 between the centres of cells (0, 1) and (0, 2)
    assert abs(int(rgba[10, 61, 3]) - 255 * 0.6 * t) <= 1
    assert np.all(np.diff(rgba[10, 46:78, 3].astype(int)) >= 0)  # rises towards the hot cell
    assert np.all(rgba[10, 77:, 3] == 153)  # edges held: no fading past the last centre
    flat = _rgba(page_units, np.full((2, 2), 7.0), 8, 8)
    assert not flat.any()  # a flat map draws nothing


def test_overlay_colour_map_is_inferno(page_units):
    from matplotlib import colormaps

    ramp = np.linspace(0.0, 1.0, 256)[np.newaxis, :]  # a 1 x 256 map: pixel x shows value x / 255
    rgba = _rgba(page_units, ramp, 256, 1)[0].astype(int)
    inferno = np.rint(colormaps["inferno"](ramp[0])[:, :3] * 255).astype(int)
    np.testing.assert_array_equal(rgba[:, :3], inferno)
    np.testing.assert_array_equal(rgba[:, 3], np.rint(255 * 0.6 * ramp[0]).astype(int))
