"""The page's heatmap functions (web/heatmap.js, run in Node) against pneumoscan.explain: the
peak of a map on the hand tables of tests/test_explain.py and on random grids, and the overlay's
colours, opacity and stretch. The maps themselves are compared in the browser (tests/test_web.py)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from conftest import needs_node
from pneumoscan.heatmap import heatmap_peak, heatmap_rgba
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


def test_python_draws_the_pages_overlay_bytes(page_units):
    """`heatmap.heatmap_rgba` (explain's overlays) gives the page's bytes exactly: random maps of
    several grid shapes stretched to several image sizes, a one-cell-wide grid, a flat map."""
    rng = np.random.default_rng(5)
    for k, (shape, out) in enumerate(
        [((3, 3), (93, 63)), ((5, 5), (160, 160)), ((10, 7), (41, 97)), ((1, 6), (30, 12)), ((4, 4), (7, 7))]
    ):
        grid = rng.normal(size=shape) * 10.0 ** rng.integers(-3, 4)
        if k == 4:
            grid = np.full(shape, 2.5)
        np.testing.assert_array_equal(heatmap_rgba(grid, *out), _rgba(page_units, grid, *out))


def test_pythons_colour_map_is_inferno():
    from matplotlib import colormaps

    ramp = np.linspace(0.0, 1.0, 256)[np.newaxis, :]
    rgba = heatmap_rgba(ramp, 256, 1)[0].astype(int)
    inferno = np.rint(colormaps["inferno"](ramp[0])[:, :3] * 255).astype(int)
    np.testing.assert_array_equal(rgba[:, :3], inferno)


# Test-time copies: (shifts, fill) as metadata.json's `test_time` names them.
COPY_CASES = [
    ("film only", [[0, 0]], 0),
    ("shipped diagonal", [[0, 0], [-2, -2], [2, 2]], 0),
    ("one axis each way", [[0, 0], [3, 0], [0, -4], [-1, 0]], 0),
    ("grey fill", [[0, 0], [2, -3]], 127.5),
]


@pytest.mark.parametrize("name, shifts, fill", COPY_CASES, ids=[c[0] for c in COPY_CASES])
def test_copies_are_pythons(page_units, name, shifts, fill):
    """The page's batch of copies is Bundle.forward's, value for value (perturb.translate where
    the fill is black)."""
    from pneumoscan.forward import shifted
    from pneumoscan.perturb import translate

    image = np.random.default_rng(len(shifts)).uniform(0, 255, (9, 9, 1)).astype(np.float32)
    test_time = {"shifts": shifts, "fill": fill}
    values = image.ravel().tolist()
    answer = page_units.call("withCopies", values=values, height=9, width=9, testTime=test_time)
    assert "error" not in answer, answer
    copies = np.asarray(answer["copies"], np.float32).reshape(answer["shape"])
    assert copies.shape == (len(shifts), 9, 9, 1)
    for copy, (dy, dx) in zip(copies, shifts, strict=True):
        np.testing.assert_array_equal(copy, np.asarray(shifted(image[np.newaxis], dy, dx, fill))[0])
        if fill == 0:
            np.testing.assert_array_equal(copy, translate(image, dy, dx))


def test_no_test_time_block_runs_the_film_alone(page_units):
    answer = page_units.call("withCopies", values=list(range(4)), height=2, width=2, testTime=None)
    assert answer["shape"] == [1, 2, 2, 1] and answer["copies"] == [0, 1, 2, 3]
    assert page_units.call("readTestTime", metadata={}, height=8, width=8) == {"spec": None}


GOOD_BLOCK = {"shifts": [[0, 0], [-1, -1], [1, 1]], "fill": 0, "combine": "mean of raw outputs"}
BAD_BLOCKS = [
    ("film not first", {"shifts": [[1, 1], [0, 0]]}),
    ("no copies", {"shifts": []}),
    ("fractional shift", {"shifts": [[0, 0], [0.5, 0]]}),
    ("shift as large as the input", {"shifts": [[0, 0], [8, 0]]}),
    ("not a pair", {"shifts": [[0, 0], [1]]}),
    ("another combination", {"combine": "median of raw outputs"}),
]


@pytest.mark.parametrize("name, change", BAD_BLOCKS, ids=[c[0] for c in BAD_BLOCKS])
def test_a_test_time_block_the_page_cannot_follow_is_refused_like_python(page_units, name, change):
    """The page refuses the blocks metadata.validate refuses (it would show another probability)."""
    from pneumoscan import metadata as metadata_io
    from pneumoscan.bundle import bundled_dir

    shipped = metadata_io.read(bundled_dir())
    good = page_units.call("readTestTime", metadata={"test_time": GOOD_BLOCK}, height=8, width=8)
    assert good == {"spec": {"shifts": GOOD_BLOCK["shifts"], "fill": 0}}
    block = {**GOOD_BLOCK, **change}
    answer = page_units.call("readTestTime", metadata={"test_time": block}, height=8, width=8)
    assert "test_time" in answer.get("error", ""), answer
    with pytest.raises(metadata_io.MetadataError, match="test_time"):
        metadata_io.validate({**shipped, "input": {**shipped["input"], "height": 8}, "test_time": block})
