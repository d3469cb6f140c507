"""The input batches of `pneumoscan train`: which films train, and what each replica gets.

Every step's global batch is `batch_size` times the number of replicas; each input pipeline
(one per worker) serves its worker's replicas their shares of it (`pipeline.training_batches`).
Order and augmentation are functions of (seed, epoch), so a resumed run sees the batches an
uninterrupted one would. With several replicas the last, short batch is dropped: a replica must
not get none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from pneumoscan import acquisition_stats, pipeline
from pneumoscan.config import Config
from pneumoscan.data import DataSplits, group_ids, inputs

DatasetFunction = Callable[[tf.distribute.InputContext], tf.data.Dataset]


@dataclass(frozen=True)
class Arrays:
    """Model inputs (n, S, S, 1) float32 in [0, 255] and their labels (n,), with optional
    per-image loss weights (n,)."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None = None


@dataclass(frozen=True)
class Batches:
    """Dataset functions for `distribute_datasets_from_function`, and the steps of an epoch."""

    train: DatasetFunction
    val: DatasetFunction
    steps: int


def make_batches(
    train: Arrays, val: Arrays, config: Config, replicas: int, epochs: range, seed: int
) -> Batches:
    """Shuffled, augmented training batches over `epochs` and validation batches in order."""
    global_batch = config.batch_size * replicas
    drop_remainder = replicas > 1
    count = len(train.labels)
    steps = count // global_batch if drop_remainder else math.ceil(count / global_batch)

    def train_batches(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return pipeline.training_batches(
            train.images,
            train.labels,
            global_batch,
            seed=seed,
            epochs=epochs,
            augment=config.augment,
            replicas=_replicas_of(context, replicas),
            drop_remainder=drop_remainder,
            weights=train.weights,
        )

    def val_batches(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return pipeline.batches(
            val.images, val.labels, global_batch, replicas=_replicas_of(context, replicas)
        )

    return Batches(train_batches, val_batches, steps)


def _replicas_of(context: tf.distribute.InputContext, replicas: int) -> tuple[int, int, int]:
    """(first, local, total) replicas served by this input pipeline: one pipeline a worker, each
    serving its worker's local replicas in turn."""
    local = replicas // context.num_input_pipelines
    return context.input_pipeline_id * local, local, replicas


def run_arrays(splits: DataSplits, config: Config) -> tuple[Arrays, Arrays]:
    """The training films (less `config.exclude_files`, weighted when `acquisition_reweight`
    asks) and the validation films of `splits`, as arrays."""
    train, val = training_films(splits, config), splits.splits["val"]
    labels = np.array([s.label for s in train])
    weights = None
    if config.acquisition_reweight > 0:
        weights = acquisition_stats.balancing_weights(
            np.stack([s.statistics for s in train]),
            labels,
            group_ids(train),
            config.random_seed,
            config.acquisition_reweight,
        )
    return Arrays(inputs(train), labels, weights), Arrays(inputs(val), np.array([s.label for s in val]))


def training_films(splits: DataSplits, config: Config) -> list:
    """The train split less the films `config.exclude_files` names."""
    excluded = set(config.exclude_files)
    return [sample for sample in splits.splits["train"] if sample.relpath not in excluded]


def left_out_of_training(splits: DataSplits, config: Config) -> int:
    """How many films of the train split `config.exclude_files` leaves out."""
    return len(splits.splits["train"]) - len(training_films(splits, config))
