"""A new model for `pneumoscan train`, and `fit_arrays()`: training on arrays as a run trains.

Benchmarks that train on arrays of their own (cross-validation folds, `benchmarks/robustness/label_noise.py`)
call `fit_arrays` instead of assembling the loop, the batches and the schedule again.
"""

from __future__ import annotations

import keras
import numpy as np

from pneumoscan.config import Config
from pneumoscan.model import build_model
from pneumoscan.training import loop
from pneumoscan.training.batches import Arrays, make_batches
from pneumoscan.training.progress import epoch_callbacks, new_state
from pneumoscan.training.schedule import learning_rate_at
from pneumoscan.training.strategy import Engine


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """n / (2 n_c): each class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=2)
    return {c: float(len(labels) / (2 * counts[c])) for c in range(2) if counts[c]}


def compile_model(
    model: keras.Model,
    learning_rate: float,
    weight_decay: float = 0.0,
    label_smoothing: float = 0.0,
    average_momentum: float = 0.0,
) -> None:
    """Adam (AdamW with weight decay), keeping an exponential moving average of the weights at
    `average_momentum` per step when it is above 0 (`loop.averaged_weights` swaps it in)."""
    average = {"use_ema": True, "ema_momentum": average_momentum} if average_momentum > 0 else {}
    optimizer = (
        keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay, **average)
        if weight_decay > 0
        else keras.optimizers.Adam(learning_rate=learning_rate, **average)
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )


def new_model(config: Config, engine: Engine) -> keras.Model:
    """The resolved `config`'s model, compiled with its optimizer built, in the strategy's scope."""
    with engine.strategy.scope():
        model = build_model(config)
        compile_model(
            model,
            learning_rate_at(config, 0, engine.replicas),
            config.weight_decay,
            config.label_smoothing,
            config.weight_average_momentum,
        )
        model.optimizer.build(model.trainable_variables)
    return model


def fit_arrays(
    model: keras.Model,
    engine: Engine,
    train: Arrays,
    val: Arrays,
    config: Config,
    callbacks: list[keras.callbacks.Callback] | None = None,
    first_epoch: int = 0,
    seed: int | None = None,
) -> None:
    """Train `model` (`new_model`) on `train`, validating on `val`, from `first_epoch` to
    `config.epochs` as `pneumoscan train` does: class weights, mixup, label smoothing, the
    schedule and early stopping of the resolved `config`.

    Args:
        callbacks: all the callbacks (a run's come with its state and checkpoint); by default
            `progress.epoch_callbacks` on a fresh state.
        seed: of the data order, augmentation and mixup; by default `config.random_seed`.
    """
    seed = config.random_seed if seed is None else seed
    if callbacks is None:
        callbacks = epoch_callbacks(config, engine.replicas, new_state(config, engine.replicas))
    batches = make_batches(train, val, config, engine.replicas, range(first_epoch, config.epochs), seed)
    loop.fit(
        model,
        engine,
        batches.train,
        batches.val,
        loop.Epochs(first_epoch, config.epochs, batches.steps),
        class_weights(train.labels) if config.class_weights else None,
        config.label_smoothing,
        callbacks,
        loop.Mixup(config.mixup, seed),
    )
