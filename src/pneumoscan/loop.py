"""The training loop behind `pneumoscan train`, one for every strategy (`pneumoscan.strategy`).

Keras' `model.fit` fails under `MultiWorkerMirroredStrategy` on TensorFlow 2.21 / Keras 3.15 (a
`PerReplica` ValueError with two workers), while a loop around `strategy.run` works; one loop
serves the single-device case too, so every strategy trains the same way. Each step runs on
every replica: its share of the global batch, the loss weighted by class and divided by the
global batch size (the sum over replicas is the mean over the batch, as `fit` computes it), and
the optimizer all-reduces the gradients. Callbacks get Keras' calls and logs, and Keras' own
progress logger prints the `Epoch k/N` lines and each epoch's `loss`, `accuracy`, `auc` and
their `val_` twins, as `fit` does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from pneumoscan.strategy import Engine


@dataclass
class Epochs:
    """What to train: `first` up to `last` (0-based, exclusive), `steps` batches each."""

    first: int
    last: int
    steps: int


def fit(
    model: keras.Model,
    engine: Engine,
    train: Callable[[tf.distribute.InputContext], tf.data.Dataset],
    val: Callable[[tf.distribute.InputContext], tf.data.Dataset],
    epochs: Epochs,
    class_weight: dict[int, float] | None,
    label_smoothing: float,
    callbacks: list[keras.callbacks.Callback],
) -> None:
    """Train `model` (compiled, built under `engine.strategy.scope()`) for `epochs`.

    Args:
        train, val: dataset functions for `distribute_datasets_from_function`, each returning
            its replica's share of every batch.
        class_weight: per-class loss weights, as `fit`'s `class_weight`.
        callbacks: Keras callbacks; they may set `model.stop_training`.
    """
    strategy = engine.strategy
    with strategy.scope():
        step = _Step(model, class_weight, label_smoothing)
    batches = iter(strategy.distribute_datasets_from_function(train))
    val_batches = strategy.distribute_datasets_from_function(val)
    progress = keras.callbacks.CallbackList(
        callbacks,
        add_progbar=True,
        model=model,
        verbose=1 if sys.stdout.isatty() else 2,
        epochs=epochs.last,
        steps=epochs.steps,
    )
    model.stop_training = False
    progress.on_train_begin()
    for epoch in range(epochs.first, epochs.last):
        step.reset()
        progress.on_epoch_begin(epoch)
        for index in range(epochs.steps):
            progress.on_train_batch_begin(index)
            step.train(next(batches))
            progress.on_train_batch_end(index, step.logs())
        for batch in val_batches:
            step.evaluate(batch)
        progress.on_epoch_end(epoch, step.logs(validation=True))
        if model.stop_training:
            break
    progress.on_train_end()


class _Step:
    """The compiled train and evaluation steps and their metrics (created in the strategy scope)."""

    def __init__(self, model: keras.Model, class_weight: dict[int, float] | None, label_smoothing: float):
        self.model = model
        self.strategy = tf.distribute.get_strategy()
        self.loss = keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing, reduction=None)
        weights = np.ones(2, np.float32)
        for label, weight in (class_weight or {}).items():
            weights[label] = weight
        self.class_weight = tf.constant(weights)
        self.metrics = {
            name: metric
            for prefix in ("", "val_")
            for name, metric in (
                (f"{prefix}loss", keras.metrics.Mean(name=f"{prefix}loss")),
                (f"{prefix}accuracy", keras.metrics.BinaryAccuracy(name=f"{prefix}accuracy")),
                (f"{prefix}auc", keras.metrics.AUC(name=f"{prefix}auc")),
            )
        }
        self.train = tf.function(self._train)
        self.evaluate = tf.function(self._evaluate)

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset_state()

    def logs(self, validation: bool = False) -> dict[str, float]:
        return {
            name: float(metric.result())
            for name, metric in self.metrics.items()
            if validation or not name.startswith("val_")
        }

    def _train(self, batch) -> None:
        model, metrics = self.model, self.metrics

        def replica(images, labels, image_weights=None):
            count = tf.cast(tf.shape(labels)[0], tf.float32)
            total = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, count)
            with tf.GradientTape() as tape:
                predictions = model(images, training=True)  # (batch, 1)
                per_image = self.loss(labels[:, None], predictions)  # (batch,)
                weights = tf.gather(self.class_weight, tf.cast(labels, tf.int32))
                if image_weights is not None:
                    weights = weights * image_weights
                loss = tf.reduce_sum(per_image * weights) / total  # this replica's part of the mean
                scaled = model.optimizer.scale_loss(loss)  # mixed precision's loss scale, else x1
            gradients = tape.gradient(scaled, model.trainable_variables)
            model.optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
            metrics["accuracy"].update_state(labels[:, None], predictions)
            metrics["auc"].update_state(labels[:, None], predictions)
            return loss, count

        loss, count = self.strategy.run(replica, args=batch)
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None)
        metrics["loss"].update_state(
            self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None), sample_weight=total
        )

    def _evaluate(self, batch) -> None:
        model, metrics = self.model, self.metrics

        def replica(images, labels, image_weights=None):
            predictions = model(images, training=False)
            metrics["val_accuracy"].update_state(labels[:, None], predictions)
            metrics["val_auc"].update_state(labels[:, None], predictions)
            per_image = self.loss(labels[:, None], predictions)
            return tf.reduce_sum(per_image), tf.cast(tf.shape(labels)[0], tf.float32)

        loss, count = self.strategy.run(replica, args=batch)
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None)
        mean = self.strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None) / tf.maximum(total, 1.0)
        metrics["val_loss"].update_state(mean, sample_weight=total)
