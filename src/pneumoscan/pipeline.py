"""tf.data input pipelines over fixed file lists: `pneumoscan train`, `evaluate`, `predict`.

decode -> grayscale -> resize (pneumoscan.preprocess) -> cache -> shuffle -> batch ->
augment (training only) -> prefetch, with `num_parallel_calls=AUTOTUNE` on every map.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
    paths: Sequence[str | Path],
    labels: Sequence[int],
    image_size: int,
    batch_size: int,
    training: bool = False,
    seed: int = 0,
    augment: AugmentConfig | None = None,
) -> tf.data.Dataset:
    """Batches of (images, labels) for `fit` and `evaluate`; files must have been scanned."""
    dataset = tf.data.Dataset.from_tensor_slices(([str(p) for p in paths], np.asarray(labels, np.float32)))
    dataset = dataset.map(
        lambda path, label: (
            tf.ensure_shape(resize(_load_luma(path), image_size), (image_size, image_size, 1)),
            label,
        ),
        num_parallel_calls=AUTOTUNE,
    ).cache()
    if training:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if training and augment is not None:
        generator = tf.random.Generator.from_seed(seed)
        dataset = dataset.map(
            lambda x, y: (augment_batch(x, generator, augment), y), num_parallel_calls=AUTOTUNE
        )
    return dataset.prefetch(AUTOTUNE)


def augment_batch(images: tf.Tensor, generator: tf.random.Generator, augment: AugmentConfig) -> tf.Tensor:
    """Random rotation, zoom and shift as ONE affine resampling per image (bilinear, zero fill),
    then brightness and contrast; values stay in [0, 255]. No flips: anatomy is not symmetric.

    One fused transform costs a third of three separate Keras augmentation layers.
    """
    shape = tf.shape(images)
    batch, height, width = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

    def uniform(low, high):
        return generator.uniform([batch], low, high)

    angle = uniform(-1.0, 1.0) * augment.rotation_degrees * (np.pi / 180.0)
    zoom = uniform(1.0 - augment.zoom, 1.0 + augment.zoom)
    shift_x, shift_y = uniform(-1.0, 1.0) * augment.shift * width, uniform(-1.0, 1.0) * augment.shift * height
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    centre_x, centre_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    # Output pixel (x, y) samples input (cos*(x-cx-tx) + sin*(y-cy-ty) + cx, -sin*(...) + cos*(...) + cy).
    from_x, from_y = centre_x + shift_x, centre_y + shift_y
    transforms = tf.stack(
        [
            cos,
            sin,
            centre_x - cos * from_x - sin * from_y,
            -sin,
            cos,
            centre_y + sin * from_x - cos * from_y,
            tf.zeros([batch]),
            tf.zeros([batch]),
        ],
        axis=1,
    )
    images = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    brightness = uniform(-augment.brightness, augment.brightness)[:, None, None, None] * 255.0
    contrast = uniform(1.0 - augment.contrast, 1.0 + augment.contrast)[:, None, None, None]
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    return tf.clip_by_value((images - mean) * contrast + mean + brightness, 0.0, 255.0)
