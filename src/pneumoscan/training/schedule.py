"""The learning rate of every epoch of `pneumoscan train` (`Config.schedule`).

`cosine`: a linear warm-up, then a cosine decay to the minimum over the remaining epochs.
`plateau`: the base rate, multiplied by `plateau_factor` after `plateau_patience` epochs
without a better val AUC. Either is times the number of replicas (the linear scaling rule:
the global batch is that many times larger).
"""

from __future__ import annotations

import math

import keras

from pneumoscan.config import Config


def learning_rate_at(config: Config, epoch: int, replicas: int = 1) -> float:
    """The scheduled learning rate of 0-based `epoch` (cosine: linear warm-up, then cosine
    decay to zero over the remaining epochs; plateau: the base rate, reduced by `Schedule`),
    times `replicas` (the linear scaling rule: the global batch is `replicas` times larger)."""
    base = config.learning_rate * replicas
    if config.schedule != "cosine":
        return base
    if epoch < config.warmup_epochs:
        return base * (epoch + 1) / (config.warmup_epochs + 1)
    progress = (epoch - config.warmup_epochs) / max(1, config.epochs - config.warmup_epochs)
    return max(0.5 * base * (1.0 + math.cos(math.pi * progress)), config.min_learning_rate * replicas)


class Schedule(keras.callbacks.Callback):
    """Sets the optimizer's learning rate each epoch, keeping `learning_rate` and `plateau_wait`
    in the run's state (`progress.new_state`). Runs after `progress.BestEpoch`, whose
    `best_epoch` says whether the epoch improved."""

    def __init__(self, config: Config, replicas: int, state: dict):
        super().__init__()
        self.config, self.replicas, self.state = config, replicas, state

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self.config.schedule == "cosine":
            self.state["learning_rate"] = learning_rate_at(self.config, epoch, self.replicas)
            self.model.optimizer.learning_rate.assign(self.state["learning_rate"])

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        state, config = self.state, self.config
        if state["best_epoch"] == epoch + 1:
            state["plateau_wait"] = 0
            return
        state["plateau_wait"] += 1
        if config.schedule == "plateau" and state["plateau_wait"] >= config.plateau_patience:
            state["learning_rate"] = max(
                state["learning_rate"] * config.plateau_factor, config.min_learning_rate * self.replicas
            )
            state["plateau_wait"] = 0
            self.model.optimizer.learning_rate.assign(state["learning_rate"])
            print(f"\nEpoch {epoch + 1}: learning rate reduced to {state['learning_rate']:.2e}")
