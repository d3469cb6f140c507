"""The training loop behind `pneumoscan train`, one for every strategy (`training.strategy`).

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from pneumoscan.training.strategy import Engine


@dataclass(frozen=True)
class Mixup:
    """Mixup of the training batches: `alpha` of Beta(alpha, alpha) (0 is off), and the seed of
    its draws, which are stateless in (seed, optimizer step, replica) so a resumed run repeats them."""

    alpha: float = 0.0
    seed: int = 0


@contextmanager
def averaged_weights(model: keras.Model) -> Iterator[None]:
    """Within the block, the model's trainable variables hold the optimizer's moving average of
    them (`use_ema`), and the average holds the trained values; both are swapped back after.
    Without a moving average, nothing changes."""
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # mixed precision wraps it
    if not getattr(optimizer, "use_ema", False):
        yield
        return
    # The average is kept in the order of the variables the optimizer was built with.
    pairs = list(zip(optimizer._trainable_variables, optimizer._model_variables_moving_average, strict=True))
    _swap(pairs)
    try:
        yield
    finally:
        _swap(pairs)


def _swap(pairs: list) -> None:
    for variable, average in pairs:
        trained = tf.identity(variable)
        variable.assign(average)
        average.assign(trained)


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
    mixup: Mixup = Mixup(),
) -> None:
    """Train `model` (compiled, built under `engine.strategy.scope()`) for `epochs`.

    Args:
        train, val: dataset functions for `distribute_datasets_from_function`, each returning
            its replica's share of every batch.
        class_weight: per-class loss weights, as `fit`'s `class_weight`.
        callbacks: Keras callbacks; they may set `model.stop_training`.
        mixup: blends each replica's images and losses (`Mixup`).

    With a moving average of the weights in the optimizer, validation runs on the average
    (`averaged_weights`, which the callbacks use to keep it too); training goes on from the
    trained values, which the checkpoint holds beside the average.
    """
    strategy = engine.strategy
    with strategy.scope():
        step = _Step(model, class_weight, label_smoothing, mixup)
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
        with averaged_weights(model):
            for batch in val_batches:
                step.evaluate(batch)
        progress.on_epoch_end(epoch, step.logs(validation=True))
        if model.stop_training:
            break
    progress.on_train_end()


class _Step:
    """The compiled train and evaluation steps and their metrics (created in the strategy scope)."""

    def __init__(
        self,
        model: keras.Model,
        class_weight: dict[int, float] | None,
        label_smoothing: float,
        mixup: Mixup = Mixup(),
    ):
        self.model, self.mixup = model, mixup
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
            weights = tf.gather(self.class_weight, tf.cast(labels, tf.int32))
            if image_weights is not None:
                weights = weights * image_weights
            if self.mixup.alpha > 0:
                images, blend = self._mix(images)
            with tf.GradientTape() as tape:
                predictions = model(images, training=True)  # (batch, 1)
                per_image = self.loss(labels[:, None], predictions) * weights  # (batch,)
                if self.mixup.alpha > 0:  # the partner's loss, as much as its image was blended in
                    partner = self.loss(tf.reverse(labels, [0])[:, None], predictions)
                    per_image = blend * per_image + (1.0 - blend) * partner * tf.reverse(weights, [0])
                loss = tf.reduce_sum(per_image) / total  # this replica's part of the mean
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

    def _mix(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Each image blended with its partner (the batch reversed): (blended images, the weight
        of each own image, >= 0.5, so labels and metrics follow the larger part)."""
        context = tf.distribute.get_replica_context()
        key = tf.stack(
            [
                tf.cast(self.mixup.seed, tf.int64),
                tf.cast(self.model.optimizer.iterations, tf.int64) * 1024
                + tf.cast(context.replica_id_in_sync_group, tf.int64),
            ]
        )
        count = tf.shape(images)[0:1]
        alpha = tf.constant(self.mixup.alpha, tf.float32)
        keys = tf.random.experimental.stateless_split(key, num=2)
        first = tf.random.stateless_gamma(count, keys[0], alpha=alpha)
        second = tf.random.stateless_gamma(count, keys[1], alpha=alpha)
        blend = first / tf.maximum(first + second, 1e-12)  # Beta(alpha, alpha)
        blend = tf.maximum(blend, 1.0 - blend)
        shaped = tf.cast(blend, images.dtype)[:, None, None, None]
        return shaped * images + (1.0 - shaped) * tf.reverse(images, [0]), blend

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
