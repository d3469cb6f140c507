"""tf.data input pipelines over fixed file lists: `pneumoscan train`, `evaluate`, `predict`.

decode -> grayscale -> resize (pneumoscan.preprocess) -> cache -> shuffle -> batch ->
augment (training only) -> prefetch, with `num_parallel_calls=AUTOTUNE` on every map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from pneumoscan.config import AugmentConfig
from pneumoscan.preprocess import ImageError, load_grayscale, resize

AUTOTUNE = tf.data.AUTOTUNE


def _load_luma(path: tf.Tensor) -> tf.Tensor:
    """tf.data wrapper around `load_grayscale`; an unreadable file yields a 0x0 image."""

    def load(raw: bytes) -> np.ndarray:
        try:
            return load_grayscale(raw.decode())
        except ImageError:
            return np.zeros((0, 0), np.uint8)

    image = tf.numpy_function(load, [path], tf.uint8, stateful=False)
    image.set_shape([None, None])
    return image


def images(paths: Sequence[str | Path], image_size: int) -> tf.data.Dataset:
    """(path, ok, image) for every path, in order; `ok` is False when the file failed to decode.

    Used by `predict`: a bad file never stops the stream.
    """
    dataset = tf.data.Dataset.from_tensor_slices([str(p) for p in paths])

    def load(path: tf.Tensor):
        luma = _load_luma(path)
        ok = tf.size(luma) > 0
        safe = tf.cond(ok, lambda: luma, lambda: tf.zeros((image_size, image_size), tf.uint8))
        return path, ok, resize(safe, image_size)

    return dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)


def labelled(
    paths: Sequence[str | Path], labels: Sequence[int], image_size: int, batch_size: int,
    training: bool = False, seed: int = 0, augment: AugmentConfig | None = None,
) -> tf.data.Dataset:
    """Batches of (images, labels) for `fit` and `evaluate`; files must have been scanned."""
    dataset = tf.data.Dataset.from_tensor_slices(
        ([str(p) for p in paths], np.asarray(labels, np.float32))
    )
    dataset = dataset.map(
        lambda path, label: (tf.ensure_shape(resize(_load_luma(path), image_size),
                                             (image_size, image_size, 1)), label),
        num_parallel_calls=AUTOTUNE,
    ).cache()
    if training:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if training and augment is not None:
        augmenter = build_augmenter(augment, seed)
        dataset = dataset.map(lambda x, y: (augmenter(x, training=True), y),
                              num_parallel_calls=AUTOTUNE)
    return dataset.prefetch(AUTOTUNE)


def build_augmenter(augment: AugmentConfig, seed: int) -> keras.Sequential:
    """Small geometric and photometric changes; no flips (anatomy is not symmetric)."""
    return keras.Sequential(
        [
            keras.layers.RandomRotation(augment.rotation_degrees / 360.0, fill_mode="constant", seed=seed),
            keras.layers.RandomZoom(augment.zoom, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomTranslation(augment.shift, augment.shift, fill_mode="constant", seed=seed + 2),
            keras.layers.RandomBrightness(augment.brightness, value_range=(0, 255), seed=seed + 3),
            keras.layers.RandomContrast(augment.contrast, value_range=(0, 255), seed=seed + 4),
        ],
        name="augment",
    )
