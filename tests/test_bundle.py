"""Bundle.forward with metadata.json's `test_time` block: the mean of the raw outputs over the
film and its shifted copies, in any batching, with the inner layer's output the film's own; and
the block that training writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CHECKER, S, raw_with_copies, window_reader
from pneumoscan.bundle import Bundle
from pneumoscan.metadata import TEST_TIME_COMBINE, copies_block

SHIFTS = [[0, 0], [-3, -3], [3, 3]]


def _with_copies(bundle: Bundle, shifts=SHIFTS) -> Bundle:
    metadata = {**bundle.metadata, "test_time": {"shifts": shifts, "fill": 0, "combine": TEST_TIME_COMBINE}}
    return Bundle(bundle.folder, bundle.model, metadata)


def _films(count: int) -> np.ndarray:
    rng = np.random.default_rng(count)
    moves = rng.integers(0, S, (count, 2))
    return np.stack([np.roll(CHECKER, (int(dy), int(dx)), (0, 1)) for dy, dx in moves]).astype(np.float32)


@pytest.mark.parametrize("count, batch_size", [(1, 32), (5, 2), (7, 7), (6, 4)])
def test_forward_is_the_mean_over_the_copies(count, batch_size):
    """A model that reads the top-left corner sees each copy differently; forward is the mean of
    its outputs on perturb.translate's copies (conftest.raw_with_copies), whatever the batching."""
    plain = window_reader(slice(0, 10), slice(0, 10))
    averaged = _with_copies(plain)
    films = _films(count)
    expected = raw_with_copies(plain.model, films, averaged.metadata)
    assert not np.allclose(expected, plain.forward(films), atol=1e-3)  # the copies matter here
    np.testing.assert_allclose(averaged.forward(films, batch_size), expected, atol=1e-6)


def test_the_inner_layer_is_the_films_own():
    plain = window_reader(slice(0, 10), slice(0, 10))
    layer = plain.model.layers[2].name  # Flatten: the film's pixels, rescaled
    films = _films(4)
    raw, features = _with_copies(plain).forward_features(films, 3, layer)
    np.testing.assert_allclose(features, films.reshape(4, -1) / 255, atol=1e-6)
    np.testing.assert_allclose(raw, _with_copies(plain).forward(films), atol=1e-7)


def test_the_film_alone_is_the_plain_model():
    plain = window_reader(slice(0, 10), slice(0, 10))
    films = _films(3)
    np.testing.assert_allclose(
        _with_copies(plain, [[0, 0]]).forward(films), np.asarray(plain.model(films)).ravel(), atol=1e-7
    )


@pytest.mark.parametrize(
    "size, fraction, step", [(160, 0.04, 6), (224, 0.04, 9), (64, 0.04, 3), (32, 0.01, 1), (64, 0.0, None)]
)
def test_the_block_names_the_film_and_two_diagonal_copies(size, fraction, step):
    block = copies_block(size, fraction)
    if step is None:
        assert block is None
        return
    assert block["shifts"] == [[0, 0], [-step, -step], [step, step]]
    assert (block["fill"], block["combine"], block["fraction"]) == (0, TEST_TIME_COMBINE, fraction)


def test_training_writes_the_block_and_calibrates_on_the_mean(trained_run):
    """The session's trained run (default --test-time-shift 0.04 at 64 px: 3-pixel copies):
    its val metrics were computed from the averaged outputs that predict computes."""
    from pneumoscan.data import inputs
    from pneumoscan.evaluate import read_file_lists, select_samples
    from pneumoscan.metrics import summarize

    root, run_dir = trained_run
    metadata = json.loads((run_dir / "metadata.json").read_text())
    assert metadata["test_time"]["shifts"] == [[0, 0], [-3, -3], [3, 3]]
    bundle = Bundle.load(run_dir)
    file_lists = read_file_lists(run_dir)
    val = select_samples(metadata, root, "val", bundle.image_size, file_lists)[0]
    labels, recorded = [s.label for s in val], metadata["metrics"]["val"]
    averaged = bundle.calibrated(bundle.forward(inputs(val)))
    film_alone = bundle.calibrated(np.asarray(bundle.model(inputs(val))).ravel())
    brier = pytest.approx(recorded["brier"], abs=1e-6)
    assert summarize(labels, averaged, bundle.threshold)["brier"] == brier
    assert summarize(labels, film_alone, bundle.threshold)["brier"] != brier
