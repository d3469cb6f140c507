"""tf.data input pipelines of `pneumoscan train` over decoded model inputs.

Training: model inputs (decoded once by `data.scan`) -> per epoch, a permutation -> batch ->
augment -> prefetch, all drawn from (seed, epoch, batch) so a resumed run repeats them exactly.
`num_parallel_calls=AUTOTUNE` on every map. (`predict`'s stream over files, which needs no
TensorFlow, is `pneumoscan.stream`.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from pneumoscan.augment import AUGMENT_DRAWS, augment_batch
from pneumoscan.config import AugmentConfig

AUTOTUNE = tf.data.AUTOTUNE


def batches(
    inputs: np.ndarray, labels: Sequence[int], batch_size: int, replicas: tuple[int, int, int] = (0, 1, 1)
) -> tf.data.Dataset:
    """Batches of (images, labels) in order, from model inputs (n, S, S, 1) (`data.inputs`).

    `replicas=(first, local, total)`: this pipeline serves replicas first .. first+local-1 of
    `total`, each taking its share of every global batch of `batch_size` (see `_shares`).
    """
    dataset = tf.data.Dataset.from_tensor_slices(np.arange(len(inputs))).batch(batch_size)
    images, targets = tf.constant(inputs), tf.constant(np.asarray(labels, np.float32))
    shares = _shares(dataset, replicas)
    return shares.map(lambda members: (tf.gather(images, members), tf.gather(targets, members))).prefetch(
        AUTOTUNE
    )


def _shares(batches: tf.data.Dataset, replicas: tuple[int, int, int]) -> tf.data.Dataset:
    """Each batch of indices split among replicas: replica r of R takes members r, r+R, ...; this
    pipeline yields, batch after batch, the shares of its replicas first .. first+local-1 (what
    `distribute_datasets_from_function` expects: one per local replica, in turn)."""
    first, local, total = replicas
    if total == 1:
        return batches
    return batches.flat_map(
        lambda members: tf.data.Dataset.range(first, first + local).map(lambda r: members[r::total])
    )


def training_batches(
    inputs: np.ndarray,
    labels: Sequence[int],
    batch_size: int,
    seed: int,
    epochs: range,
    augment: AugmentConfig | None = None,
    replicas: tuple[int, int, int] = (0, 1, 1),
    drop_remainder: bool = False,
    weights: Sequence[float] | None = None,
) -> tf.data.Dataset:
    """Training batches of (images, labels), or (images, labels, weights) with per-image loss
    `weights`, epoch after epoch over `epochs` (0-based, e.g.
    `range(3, 30)` to resume after the third), shuffled and augmented.

    Each epoch's order and each image's augmentation are drawn by stateless random ops from
    (seed, epoch) alone, so a run resumed after epoch k sees exactly the batches an uninterrupted
    run would, and one iterator serves every epoch (a fresh iterator per epoch sometimes left the
    CPU idle for ~10 s before its first batch). `batch_size` is the global batch; with
    `replicas=(first, local, total)` this pipeline yields its replicas' shares of each (replica r
    of R takes members r, r+R, ...), each image augmented as it would be in one piece, so any
    number of replicas trains on the same data.
    """
    images = tf.constant(inputs)  # (n, S, S, 1)
    targets = tf.constant(np.asarray(labels, np.float32))
    per_image = None if weights is None else tf.constant(np.asarray(weights, np.float32))
    count = len(inputs)

    def epoch(number: tf.Tensor) -> tf.data.Dataset:
        key = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), number)
        order_key, draw_key = tf.unstack(tf.random.experimental.stateless_split(key, num=2))
        order = tf.argsort(tf.random.stateless_uniform([count], seed=order_key))  # a permutation
        draws = tf.random.stateless_uniform([count, AUGMENT_DRAWS], seed=draw_key)  # one row an image
        steps = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=drop_remainder)

        def batch(members: tf.Tensor):
            x = tf.gather(images, members)
            if augment is not None:
                x = augment_batch(x, tf.gather(draws, members), augment)
            if per_image is None:
                return x, tf.gather(targets, members)
            return x, tf.gather(targets, members), tf.gather(per_image, members)

        return _shares(steps, replicas).map(batch, num_parallel_calls=AUTOTUNE, deterministic=True)

    dataset = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch)
    return dataset.prefetch(AUTOTUNE)
