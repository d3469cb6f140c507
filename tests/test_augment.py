"""pneumoscan.augment: each acquisition augmentation does what it says, only where it says, is
off at 0, and an image's result depends on its own draws alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from conftest import SAMPLES
from pneumoscan.augment import AUGMENT_DRAWS, DRAWS, augment_batch
from pneumoscan.config import AugmentConfig
from pneumoscan.preprocess import decode_to_input

S = 96
X = np.stack([decode_to_input(p, S) for p in sorted(SAMPLES.rglob("*.jpeg"))[:3]])  # (3, 96, 96, 1)
STILL = AugmentConfig(rotation_degrees=0, zoom=0, translation=0, brightness=0, contrast=0)


def _draws(**values: float) -> np.ndarray:
    """One row per image of X: 0.5 (the neutral middle) except the given columns."""
    row = np.full(AUGMENT_DRAWS, 0.5, np.float32)
    for name, value in values.items():
        row[DRAWS.index(name)] = value
    return np.tile(row, (len(X), 1))


def _run(augment: AugmentConfig, draws: np.ndarray, images: np.ndarray = X) -> np.ndarray:
    return augment_batch(tf.constant(images), tf.constant(draws), augment).numpy()


def _high_frequency(images: np.ndarray) -> float:
    return float(np.abs(np.diff(images, axis=1)).mean() + np.abs(np.diff(images, axis=2)).mean())


def _bright_rows(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    changed = np.abs(after - before)[..., 0] > 1.0
    return np.nonzero(changed.any(axis=(0, 2)))[0]


# name, config change, draws, check(before, after)
CASES = [
    ("gamma above 1 darkens", {"gamma": 0.5}, {"gamma": 1.0}, lambda b, a: a.mean() < b.mean() - 5),
    ("gamma below 1 brightens", {"gamma": 0.5}, {"gamma": 0.0}, lambda b, a: a.mean() > b.mean() + 5),
    (
        "detail blurs",
        {"detail": 1.0},
        {"detail": 1.0},
        lambda b, a: _high_frequency(a) < 0.8 * _high_frequency(b),
    ),
    (
        "detail sharpens",
        {"detail": 1.0},
        {"detail": 0.0},
        lambda b, a: _high_frequency(a) > 1.2 * _high_frequency(b),
    ),
    (
        "noise of 8 grey levels",
        {"noise": 8.0},
        {"noise_sigma": 1.0},
        lambda b, a: 6.0 < np.std(a - b) < 9.0 and abs(np.mean(a - b)) < 1.0,
    ),
    (
        "a text stamp in the top fifth",
        {"text_stamps": 1.0},
        {"stamp_on": 0.0, "stamp_y": 0.5, "stamp_value": 1.0},
        lambda b, a: (
            len(_bright_rows(b, a)) > 0 and _bright_rows(b, a).max() < 0.2 * S + 6 and a.max() == 255
        ),
    ),
    (
        "a text stamp in the bottom tenth",
        {"text_stamps": 1.0},
        {"stamp_on": 0.0, "stamp_y": 0.9},
        lambda b, a: len(_bright_rows(b, a)) > 0 and _bright_rows(b, a).min() >= 0.85 * S - 1,
    ),
    (
        "an erased rectangle of the image's mean",
        {"erase": 1.0},
        {"erase_on": 0.0, "erase_height": 0.0, "erase_width": 1.0, "erase_x": 0.0, "erase_y": 0.0},
        lambda b, a: (
            np.allclose(
                a[:, : round(0.1 * S) - 1, : round(0.3 * S) - 1],
                b.mean(axis=(1, 2, 3))[:, None, None, None],
                atol=1e-3,
            )
            and np.allclose(a[:, round(0.1 * S) + 1 :], b[:, round(0.1 * S) + 1 :], atol=1e-3)
        ),
    ),
]


@pytest.mark.parametrize("name, change, draws, check", CASES, ids=[c[0] for c in CASES])
def test_each_acquisition_change(name, change, draws, check):
    after = _run(dataclasses.replace(STILL, **change), _draws(**draws))
    assert after.shape == X.shape and after.min() >= 0 and after.max() <= 255
    assert check(X, after)


@pytest.mark.parametrize("field", ["gamma", "detail", "noise", "text_stamps", "erase"])
def test_off_at_zero_and_neutral_in_the_middle(field):
    extreme = dict.fromkeys(DRAWS, 0.0) | {"noise_sigma": 1.0, "gamma": 1.0, "detail": 1.0}
    np.testing.assert_allclose(_run(STILL, _draws(**extreme)), X, atol=1e-3)  # every field at 0
    if field in ("gamma", "detail"):  # a draw of 0.5 is the identity
        np.testing.assert_allclose(_run(dataclasses.replace(STILL, **{field: 1.0}), _draws()), X, atol=1e-2)


def test_an_image_depends_on_its_own_draws_alone():
    everything = dataclasses.replace(
        AugmentConfig(), gamma=0.3, detail=0.5, noise=4.0, text_stamps=0.5, erase=0.5
    )
    draws = np.random.default_rng(0).uniform(size=(len(X), AUGMENT_DRAWS)).astype(np.float32)
    together = _run(everything, draws)
    for index in range(len(X)):
        alone = _run(everything, draws[index : index + 1], X[index : index + 1])
        np.testing.assert_allclose(alone[0], together[index], atol=1e-4)


def _square(side: int) -> np.ndarray:
    """(1, S, S, 1): a white square of `side` pixels in the middle of a grey film."""
    image = np.full((1, S, S, 1), 100.0, np.float32)
    low = (S - side) // 2
    image[0, low : low + side, low : low + side] = 255.0
    return image


@pytest.mark.parametrize(
    "zoom_draw, magnification",
    [(0.0, 1.0), (0.5, 2.0**0.5), (0.999, 2.0)],  # log-uniform in [1, zoom_in)
)
def test_zoom_in_magnifies_log_uniformly_and_never_zooms_out(zoom_draw, magnification):
    crop = dataclasses.replace(STILL, zoom=0.5, zoom_in=2.0)  # zoom_in replaces zoom
    square = _square(24)
    draws = _draws(zoom=zoom_draw)[:1]
    after = _run(crop, draws, square)
    width = (after[0, S // 2, :, 0] > 180).sum()
    assert abs(width - 24 * magnification) <= 2
    assert after[0, 0, 0, 0] == pytest.approx(100.0, abs=1e-3)  # no black fill comes in


def test_zoom_in_below_one_is_refused():
    with pytest.raises(ValueError, match="zoom-in must be 0"):
        AugmentConfig(zoom_in=0.5)
