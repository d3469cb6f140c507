"""pneumoscan.pipeline: tf.data shapes, dtypes, ranges; augmentation on training only. (The
prediction stream over files is tests/test_stream.py.)"""

from __future__ import annotations

import numpy as np

from conftest import SAMPLES
from pneumoscan.config import AugmentConfig
from pneumoscan.data import inputs, scan
from pneumoscan.pipeline import batches, training_batches
from pneumoscan.preprocess import decode_to_input

PATHS = sorted(SAMPLES.rglob("*.jpeg"))[:6]
LABELS = [int(p.parent.name == "PNEUMONIA") for p in PATHS]


def _inputs(size: int) -> np.ndarray:
    """The model inputs of PATHS at `size`, from the scan's one decode."""
    by_path = {sample.path: sample for sample in scan(SAMPLES, image_size=size).samples}
    return inputs([by_path[path] for path in PATHS])


def _batches(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_evaluation_batches_match_decode_to_input():
    made = _batches(batches(_inputs(96), LABELS, batch_size=4))
    assert [x.shape for x, _ in made] == [(4, 96, 96, 1), (2, 96, 96, 1)]
    x = np.concatenate([b[0] for b in made])
    y = np.concatenate([b[1] for b in made])
    assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 255
    np.testing.assert_array_equal(y, LABELS)
    for got, path in zip(x, PATHS, strict=True):
        np.testing.assert_allclose(got, decode_to_input(path, 96), atol=1e-4)


def test_training_batches_are_augmented_shuffled_and_in_range():
    plain = np.concatenate([x for x, _ in _batches(batches(_inputs(96), LABELS, batch_size=6))])
    dataset = training_batches(
        _inputs(96), LABELS, batch_size=6, seed=3, epochs=range(2), augment=AugmentConfig()
    )
    ((x1, y1), (x2, _)) = _batches(dataset)  # one batch per epoch
    assert x1.shape == (6, 96, 96, 1) and x1.dtype == np.float32
    assert x1.min() >= 0 and x1.max() <= 255
    assert sorted(y1) == sorted(LABELS)
    assert not np.allclose(x1, x2), "two epochs should see different augmentations or order"
    matched = [min(np.abs(a - p).mean() for p in plain) for a in x1]
    assert max(matched) > 0.5, "training images should differ from the plain ones"


def test_training_batches_carry_each_images_weight_with_it():
    x = np.arange(6, dtype=np.float32)[:, None, None, None] * np.ones((6, 8, 8, 1), np.float32)
    weights = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    dataset = training_batches(x, [0, 1, 0, 1, 0, 1], batch_size=4, seed=3, epochs=range(2), weights=weights)
    seen = 0
    for batch, labels, batch_weights in dataset.as_numpy_iterator():
        index = batch[:, 0, 0, 0].astype(int)  # each image is its index, unaugmented
        np.testing.assert_array_equal(batch_weights, np.array(weights, np.float32)[index])
        np.testing.assert_array_equal(labels, index % 2)
        seen += len(index)
    assert seen == 12


def test_every_acquisition_augmentation_runs_inside_the_pipeline():
    every = AugmentConfig(gamma=0.3, detail=0.7, noise=4.0, text_stamps=0.5, erase=0.5)
    dataset = training_batches(_inputs(64), LABELS, batch_size=6, seed=1, epochs=range(1), augment=every)
    ((x, _),) = _batches(dataset)  # traced as a graph by tf.data, as in training
    assert x.shape == (6, 64, 64, 1) and x.min() >= 0 and x.max() <= 255


def test_augmentation_with_zero_strength_is_the_identity():
    import tensorflow as tf

    from pneumoscan.augment import AUGMENT_DRAWS, augment_batch

    x = np.stack([decode_to_input(p, 64) for p in PATHS[:3]])
    none = AugmentConfig(rotation_degrees=0, zoom=0, translation=0, brightness=0, contrast=0)
    out = augment_batch(tf.constant(x), tf.random.uniform([3, AUGMENT_DRAWS]), none).numpy()
    np.testing.assert_allclose(out, x, atol=1e-3)


def test_training_batches_depend_on_seed_and_epoch_alone():
    """A run resumed at epoch 1 sees exactly the batches an uninterrupted run sees there."""
    x = _inputs(64)

    def run(seed: int, epochs: range) -> list:
        return _batches(
            training_batches(x, LABELS, batch_size=4, seed=seed, epochs=epochs, augment=AugmentConfig())
        )

    whole, resumed, other = run(3, range(3)), run(3, range(1, 3)), run(4, range(3))
    assert len(whole) == 6 and len(resumed) == 4  # 2 batches (4 + 2 images) per epoch
    for (xa, ya), (xb, yb) in zip(whole[2:], resumed, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(whole[0][0], whole[2][0])  # epochs differ
    assert not np.array_equal(whole[0][0], other[0][0])  # seeds differ


def test_replicas_share_each_global_batch_and_augment_it_alike():
    """Replica r of R gets members r, r+R, ... of each global batch, augmented exactly as in one
    piece: two replicas together train on what one replica would."""
    x = _inputs(64)

    def run(replica: tuple[int, int]) -> list:
        dataset = training_batches(
            x,
            LABELS,
            batch_size=4,
            seed=3,
            epochs=range(2),
            augment=AugmentConfig(),
            replicas=(replica[0], 1, replica[1]),
        )
        return _batches(dataset)

    whole, first, second = run((0, 1)), run((0, 2)), run((1, 2))
    assert [len(b[0]) for b in whole] == [4, 2, 4, 2] and [len(b[0]) for b in first] == [2, 1, 2, 1]
    for (xw, yw), (x0, y0), (x1, y1) in zip(whole, first, second, strict=True):
        np.testing.assert_array_equal(xw[0::2], x0)
        np.testing.assert_array_equal(xw[1::2], x1)
        np.testing.assert_array_equal(np.concatenate([y0, y1]), np.concatenate([yw[0::2], yw[1::2]]))
