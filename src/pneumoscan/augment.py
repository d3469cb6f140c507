"""Training-only augmentation (`pneumoscan train`), on batches inside tf.data.

Geometry: rotation, zoom (out and in, or in only: a random crop) and translation as ONE affine
resampling per image (bilinear, zero fill). Intensity: brightness and contrast. Acquisition
(each off at 0, see `AugmentConfig`): gamma, detail (blur toward a Gaussian of the image, or
unsharp masking away from it), noise, burned-in text stamps pasted onto films of both classes,
and erasing a random rectangle.
No flips: anatomy is not symmetric. Values stay in [0, 255].

Every random number of an image comes from its own row of `draws` (uniforms in [0, 1), drawn
by the pipeline from (seed, epoch) per image), so an image's augmentation does not depend on
the batch it is in, and a resumed run repeats it exactly.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from pneumoscan import perturb
from pneumoscan.config import AugmentConfig

# Columns of `draws`, in order.
DRAWS = (
    "angle", "zoom", "shift_x", "shift_y", "brightness", "contrast",
    "gamma", "detail", "noise_sigma", "noise_field",
    "stamp_on", "stamp_kind", "stamp_x", "stamp_y", "stamp_value",
    "erase_on", "erase_height", "erase_width", "erase_x", "erase_y",
)  # fmt: skip
AUGMENT_DRAWS = len(DRAWS)
DETAIL_SIGMA = 1.5  # the Gaussian `detail` blends toward, in pixels of a 224-pixel image
NOISE_FIELDS = 8  # fixed unit-variance noise fields an image picks one of
# Burned-in text as films carry it: timestamps, side markers and labels.
STAMPS = ("12:34 05/06", "08:15 11/02", "R", "L", "PORTABLE", "AP", "SUPINE", "ERECT", "1/2", "PA")
STAMP_HEIGHT = 0.045  # text height, a fraction of the side
ERASE_SIDES = (0.1, 0.3)  # an erased rectangle's sides, fractions of the image's


def augment_batch(images: tf.Tensor, draws: tf.Tensor, augment: AugmentConfig) -> tf.Tensor:
    """(batch, S, S, 1) float32 in [0, 255] and (batch, AUGMENT_DRAWS) draws -> augmented."""
    draw = dict(zip(DRAWS, tf.unstack(draws, num=AUGMENT_DRAWS, axis=1), strict=True))
    static = images.shape  # the resampling op forgets it; the steps below need the side
    images = _geometry(images, draw, augment)
    images.set_shape(static)
    images = _intensity(images, draw, augment)
    if augment.gamma > 0:
        log_range = np.log1p(augment.gamma)
        gamma = tf.exp((2.0 * draw["gamma"] - 1.0) * log_range)[:, None, None, None]
        images = 255.0 * tf.pow(tf.clip_by_value(images, 0.0, 255.0) / 255.0, gamma)
    if augment.detail > 0:
        amount = ((2.0 * draw["detail"] - 1.0) * augment.detail)[:, None, None, None]
        images = images + amount * (_gaussian(images) - images)
    if augment.noise > 0:
        fields = tf.gather(
            _noise_fields(images.shape[1]), tf.cast(draw["noise_field"] * NOISE_FIELDS, tf.int32)
        )
        images = images + (draw["noise_sigma"] * augment.noise)[:, None, None, None] * fields
    if augment.text_stamps > 0:
        images = _stamp(images, draw, augment.text_stamps)
    if augment.erase > 0:
        images = _erase(images, draw, augment.erase)
    return tf.clip_by_value(images, 0.0, 255.0)


def _geometry(images: tf.Tensor, draw: dict, augment: AugmentConfig) -> tf.Tensor:
    shape = tf.shape(images)
    batch, height, width = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    angle = (2.0 * draw["angle"] - 1.0) * augment.rotation_degrees * (np.pi / 180.0)
    if augment.zoom_in > 0:  # crop in only: magnification log-uniform in [1, zoom_in)
        zoom = tf.exp(draw["zoom"] * float(np.log(augment.zoom_in)))
    else:
        zoom = 1.0 - augment.zoom + draw["zoom"] * 2.0 * augment.zoom
    shift_x = (2.0 * draw["shift_x"] - 1.0) * augment.translation * width
    shift_y = (2.0 * draw["shift_y"] - 1.0) * augment.translation * height
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    centre_x, centre_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    # Output pixel (x, y) samples input (cos*(x-cx-tx) + sin*(y-cy-ty) + cx, -sin*(...) + cos*(...) + cy).
    from_x, from_y = centre_x + shift_x, centre_y + shift_y
    zeros = tf.zeros([batch])
    transforms = tf.stack(
        [
            cos,
            sin,
            centre_x - cos * from_x - sin * from_y,
            -sin,
            cos,
            centre_y + sin * from_x - cos * from_y,
            zeros,
            zeros,
        ],
        axis=1,
    )
    return _transform(images, transforms, shape[1:3])


def _transform(images: tf.Tensor, transforms: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=size,
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def _intensity(images: tf.Tensor, draw: dict, augment: AugmentConfig) -> tf.Tensor:
    brightness = ((2.0 * draw["brightness"] - 1.0) * augment.brightness)[:, None, None, None] * 255.0
    contrast = (1.0 - augment.contrast + draw["contrast"] * 2.0 * augment.contrast)[:, None, None, None]
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    return tf.clip_by_value((images - mean) * contrast + mean + brightness, 0.0, 255.0)


def _gaussian(images: tf.Tensor) -> tf.Tensor:
    """A Gaussian blur of DETAIL_SIGMA (scaled to the image size), zero padding compensated."""
    sigma = DETAIL_SIGMA * images.shape[1] / 224.0
    radius = max(1, int(np.ceil(3 * sigma)))
    line = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = tf.constant(np.outer(line, line)[:, :, None, None] / line.sum() ** 2, tf.float32)
    blurred = tf.nn.conv2d(images, kernel, strides=1, padding="SAME")
    weight = tf.nn.conv2d(tf.ones_like(images[:1]), kernel, strides=1, padding="SAME")
    return blurred / weight


def _noise_fields(size: int) -> tf.Tensor:
    """(NOISE_FIELDS, size, size, 1) fixed standard-normal fields."""
    return tf.constant(_noise_array(size))


@functools.cache
def _noise_array(size: int) -> np.ndarray:
    return np.random.default_rng(20180222).standard_normal((NOISE_FIELDS, size, size, 1)).astype(np.float32)


def _stamp_bank(size: int) -> tf.Tensor:
    """(len(STAMPS), size, size, 1) masks in {0, 1}: each text at the top-left corner."""
    return tf.constant(_stamp_array(size))


@functools.cache
def _stamp_array(size: int) -> np.ndarray:
    height = max(5, round(STAMP_HEIGHT * size))
    bank = np.zeros((len(STAMPS), size, size, 1), np.float32)
    for index, text in enumerate(STAMPS):
        ink = perturb.glyph(text)
        width = min(size, max(1, round(ink.shape[1] * height / ink.shape[0])))
        bank[index, :height, :width, 0] = perturb.resize_nearest(ink, height, width)
    return bank


def _stamp(images: tf.Tensor, draw: dict, probability: float) -> tf.Tensor:
    """Bright text pasted, with `probability`, at a random place in the top fifth or the bottom
    tenth of the film, whatever its class: text that both classes carry predicts neither."""
    size = images.shape[1]
    bank = _stamp_bank(size)
    masks = tf.gather(bank, tf.cast(draw["stamp_kind"] * len(STAMPS), tf.int32))
    top_band = draw["stamp_y"] < 0.75
    y = tf.where(top_band, draw["stamp_y"] / 0.75 * 0.2, 0.85 + (draw["stamp_y"] - 0.75) / 0.25 * 0.1) * size
    x = draw["stamp_x"] * 0.85 * size
    ones, zeros = tf.ones_like(x), tf.zeros_like(x)
    moves = tf.stack([ones, zeros, -x, zeros, ones, -y, zeros, zeros], axis=1)  # translate by (x, y)
    placed = _transform(masks, moves, tf.constant([size, size]))
    on = tf.cast(draw["stamp_on"] < probability, tf.float32)[:, None, None, None]
    value = (200.0 + 55.0 * draw["stamp_value"])[:, None, None, None]
    return images + on * placed * (value - images)


def _erase(images: tf.Tensor, draw: dict, probability: float) -> tf.Tensor:
    """With `probability`, a random rectangle filled with the image's mean (cutout)."""
    size = tf.cast(tf.shape(images)[1], tf.float32)
    low, high = ERASE_SIDES
    height = (low + draw["erase_height"] * (high - low)) * size
    width = (low + draw["erase_width"] * (high - low)) * size
    top, left = draw["erase_y"] * (size - height), draw["erase_x"] * (size - width)
    grid = tf.range(size)
    rows = (grid[None, :] >= top[:, None]) & (grid[None, :] < (top + height)[:, None])  # (batch, S)
    cols = (grid[None, :] >= left[:, None]) & (grid[None, :] < (left + width)[:, None])
    box = tf.cast(rows[:, :, None] & cols[:, None, :], tf.float32)[..., None]
    on = tf.cast(draw["erase_on"] < probability, tf.float32)[:, None, None, None]
    mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
    return images + on * box * (mean - images)
