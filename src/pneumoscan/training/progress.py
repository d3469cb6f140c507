"""What a run of `pneumoscan train` has done so far, and the callbacks that keep it.

The state (`new_state`) is one JSON-able dict: the checkpoint saves it as `state.json` and a
resumed run restores it exactly (Keras' own callbacks reset theirs in `on_train_begin`). Each
callback keeps its part of it; `epoch_callbacks` gives them in the order their epoch ends must
run: `History` (the epoch's row and time), `BestEpoch` (best val AUC, early stopping), then
`schedule.Schedule` (plateau reduction, which asks whether the epoch improved).
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import keras

from pneumoscan.atomic import write_bytes_atomic
from pneumoscan.config import Config
from pneumoscan.training.schedule import Schedule, learning_rate_at

HISTORY_FIELDS = (
    "epoch",
    "loss",
    "accuracy",
    "auc",
    "val_loss",
    "val_accuracy",
    "val_auc",
    "learning_rate",
    "seconds",
)


def new_state(config: Config, replicas: int) -> dict:
    """The state of a run that has trained no epoch yet."""
    return {
        "epochs_done": 0,
        "best_val_auc": -math.inf,
        "best_epoch": 0,
        "epochs_without_improvement": 0,
        "plateau_wait": 0,
        "learning_rate": learning_rate_at(config, 0, replicas),
        "stopped_early": False,
        "history": [],
        "seconds": 0.0,
        "replicas": replicas,
    }


def epoch_callbacks(config: Config, replicas: int, state: dict) -> list[keras.callbacks.Callback]:
    """The callbacks that keep `state`, in the order they must run."""
    return [History(state), BestEpoch(config, state), Schedule(config, replicas, state)]


class History(keras.callbacks.Callback):
    """One row per epoch (`HISTORY_FIELDS`), `epochs_done` and the seconds spent."""

    def __init__(self, state: dict):
        super().__init__()
        self.state, self._epoch_start = state, 0.0

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        logs, state = logs or {}, self.state
        seconds = time.perf_counter() - self._epoch_start
        state["history"].append(
            {
                "epoch": epoch + 1,
                **{k: float(logs[k]) for k in HISTORY_FIELDS if k in logs},
                "learning_rate": state["learning_rate"],
                "seconds": round(seconds, 2),
            }
        )
        state["epochs_done"], state["seconds"] = epoch + 1, state["seconds"] + seconds


class BestEpoch(keras.callbacks.Callback):
    """The best epoch by val AUC, and early stopping after `early_stopping_patience` epochs
    without a better one."""

    def __init__(self, config: Config, state: dict):
        super().__init__()
        self.config, self.state = config, state

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        state = self.state
        val_auc = float((logs or {}).get("val_auc", float("nan")))
        # The first epoch is always "best so far", even if its AUC is undefined (NaN).
        if val_auc > state["best_val_auc"] or state["best_epoch"] == 0:
            state.update(best_val_auc=val_auc, best_epoch=epoch + 1, epochs_without_improvement=0)
        else:
            state["epochs_without_improvement"] += 1
        if state["epochs_without_improvement"] >= self.config.early_stopping_patience:
            state["stopped_early"] = True
            self.model.stop_training = True


def write_history(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode())
