"""Train a model from scratch: `pneumoscan train --data DIR --out RUN_DIR`.

RUN_DIR ends up holding `model.keras` (best epoch by validation AUC), `metadata.json`,
`config.json`, `history.csv`, `splits.json` and TensorBoard `logs/`. While training, an
atomic, fsynced per-epoch `checkpoint/` (model with optimizer state, best weights so far, the
random state of dropout, and the state of best-score tracking, early stopping and learning-rate
reduction) lets the same command resume after any interruption, kill -9 included. Data order
and augmentation are functions of (seed, epoch), so the resumed epochs are the ones an
uninterrupted run would have trained.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from pneumoscan import metadata as metadata_io
from pneumoscan import pipeline
from pneumoscan.bundle import Bundle
from pneumoscan.calibrate import describe_calibration, fit_operating_point
from pneumoscan.config import Config
from pneumoscan.data import DataSplits, inputs, load_splits
from pneumoscan.io import (
    recover_dir,
    replace_dir_atomic,
    save_model_atomic,
    write_bytes_atomic,
    write_json_atomic,
)
from pneumoscan.model import build_model

CHECKPOINT = "checkpoint"
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


class RunConflict(ValueError):
    """RUN_DIR holds a run with another configuration or other data (exit 2)."""


@dataclass
class TrainResult:
    run_dir: Path
    already_finished: bool
    resumed_from_epoch: int
    best_epoch: int
    best_val_auc: float


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """n / (2 n_c): each class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=2)
    return {c: float(len(labels) / (2 * counts[c])) for c in range(2) if counts[c]}


def learning_rate_at(config: Config, epoch: int) -> float:
    """The scheduled learning rate of 0-based `epoch` (cosine: linear warm-up, then cosine
    decay to zero over the remaining epochs; plateau: the base rate, reduced by RunState)."""
    base = config.learning_rate
    if config.schedule != "cosine":
        return base
    if epoch < config.warmup_epochs:
        return base * (epoch + 1) / (config.warmup_epochs + 1)
    progress = (epoch - config.warmup_epochs) / max(1, config.epochs - config.warmup_epochs)
    return max(0.5 * base * (1.0 + math.cos(math.pi * progress)), config.min_learning_rate)


def compile_model(
    model: keras.Model, learning_rate: float, weight_decay: float = 0.0, label_smoothing: float = 0.0
) -> None:
    optimizer = (
        keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
        if weight_decay > 0
        else keras.optimizers.Adam(learning_rate=learning_rate)
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )


class RunState(keras.callbacks.Callback):
    """Best-epoch tracking, early stopping, LR reduction on plateau and the atomic checkpoint.

    One object holds all the state that must survive an interruption, so resuming restores
    it exactly (Keras' own callbacks reset theirs in `on_train_begin`).
    """

    def __init__(self, run_dir: Path, config: Config, state: dict | None = None):
        super().__init__()
        self.run_dir, self.config = run_dir, config
        self.state = state or {
            "epochs_done": 0,
            "best_val_auc": -math.inf,
            "best_epoch": 0,
            "epochs_without_improvement": 0,
            "plateau_wait": 0,
            "learning_rate": config.learning_rate,
            "stopped_early": False,
            "history": [],
            "seconds": 0.0,
        }
        self._epoch_start = 0.0

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._epoch_start = time.perf_counter()
        if self.config.schedule == "cosine":
            self.state["learning_rate"] = learning_rate_at(self.config, epoch)
            self.model.optimizer.learning_rate.assign(self.state["learning_rate"])

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        logs, state = logs or {}, self.state
        val_auc = float(logs.get("val_auc", float("nan")))
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
        # The first epoch is always "best so far", even if its AUC is undefined (NaN).
        improved = val_auc > state["best_val_auc"] or state["best_epoch"] == 0
        if improved:
            state.update(
                best_val_auc=val_auc, best_epoch=epoch + 1, epochs_without_improvement=0, plateau_wait=0
            )
        else:
            state["epochs_without_improvement"] += 1
            state["plateau_wait"] += 1
            if self.config.schedule == "plateau" and state["plateau_wait"] >= self.config.plateau_patience:
                state["learning_rate"] = max(
                    state["learning_rate"] * self.config.plateau_factor, self.config.min_learning_rate
                )
                state["plateau_wait"] = 0
                self.model.optimizer.learning_rate.assign(state["learning_rate"])
                print(f"\nEpoch {epoch + 1}: learning rate reduced to {state['learning_rate']:.2e}")
        if state["epochs_without_improvement"] >= self.config.early_stopping_patience:
            state["stopped_early"] = True
            self.model.stop_training = True
        self._save(improved)

    def _save(self, improved: bool) -> None:
        """Write the whole checkpoint into a fresh folder, then swap it in (`io.replace_dir_atomic`)."""
        final, build = self.run_dir / CHECKPOINT, _checkpoint_build(self.run_dir)
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir()
        self.model.save(build / "model.keras")
        if improved:
            self.model.save_weights(build / "best.weights.h5")
        else:
            shutil.copy2(final / "best.weights.h5", build / "best.weights.h5")
        self.state["random_state"] = random_state(self.model)
        (build / "state.json").write_text(json.dumps(self.state, indent=2))
        replace_dir_atomic(build, final)
        write_history(self.run_dir / "history.csv", self.state["history"])


def _checkpoint_build(run_dir: Path) -> Path:
    return run_dir / f".{CHECKPOINT}.new"


def _seed_states(model: keras.Model) -> dict[str, keras.Variable]:
    """The seed-generator states of the model's layers, keyed `layer/index`: variable paths carry
    a process-wide counter (`seed_generator_1`) that differs between a run and its resumption."""
    found = {}
    for layer in model.layers:
        states = [v for v in layer.variables if v.path.endswith("seed_generator_state")]
        found.update({f"{layer.name}/{index}": variable for index, variable in enumerate(states)})
    return found


def random_state(model: keras.Model) -> dict[str, list[int]]:
    """The state of every seed generator in the model (dropout's): Keras does not save it with
    the model, and a resumed run must draw the masks an uninterrupted one would."""
    return {key: np.asarray(variable.numpy()).tolist() for key, variable in _seed_states(model).items()}


def restore_random_state(model: keras.Model, state: dict[str, list[int]]) -> None:
    for key, variable in _seed_states(model).items():
        if key in state:
            variable.assign(np.asarray(state[key], dtype=variable.dtype))


def write_history(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buffer.getvalue().encode())


def check_existing_run(run_dir: Path, config: Config, overwrite: bool) -> str:
    """'new', 'resume' or 'finished'.

    Raises:
        RunConflict: the folder holds a run with a different configuration.
    """
    config_path = run_dir / "config.json"
    recover_dir(run_dir / CHECKPOINT, _checkpoint_build(run_dir))  # a crash inside the last swap
    if overwrite and run_dir.exists():
        for name in ("model.keras", "metadata.json", "config.json", "history.csv", "splits.json"):
            (run_dir / name).unlink(missing_ok=True)
        for name in (CHECKPOINT, "logs", f".{CHECKPOINT}.new", f".{CHECKPOINT}.old"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
    if not config_path.exists():
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunConflict(
                f"{run_dir}: folder is not empty and holds no pneumoscan run; "
                "choose another --out or pass --overwrite."
            )
        return "new"
    # Resolved: a run recorded before a recipe field existed holds the recipe value implicitly.
    differences = Config.load(config_path).resolved().differences(config)
    if differences:
        raise RunConflict(
            f"{run_dir} holds a run with a different configuration ("
            + "; ".join(differences)
            + "); pass --overwrite to start over."
        )
    if (run_dir / "metadata.json").exists() and (run_dir / "model.keras").exists():
        return "finished"
    return "resume" if (run_dir / CHECKPOINT / "state.json").exists() else "new"


def _check_same_data(run_dir: Path, splits: DataSplits) -> None:
    saved = json.loads((run_dir / "splits.json").read_text())
    now = splits.file_lists()
    for name in saved["splits"]:
        if saved["splits"][name] != now["splits"].get(name):
            raise RunConflict(
                f"{run_dir}: the {name} split of {splits.root} differs from the one "
                "this run was started on; pass --overwrite to start over."
            )


def train(
    config: Config,
    data_dir: Path,
    run_dir: Path,
    overwrite: bool = False,
    extra_callbacks: list | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `config` on the train split of `data_dir`, selecting on its val split."""
    config, run_dir = config.resolved(), Path(run_dir)
    status = check_existing_run(run_dir, config, overwrite)
    if status == "finished":
        meta = metadata_io.read(run_dir)
        log(
            f"{run_dir} already holds a finished run (best epoch {meta['training']['best_epoch']}, "
            f"val AUC {meta['training']['best_val_auc']:.4f}); nothing to do."
        )
        return TrainResult(run_dir, True, 0, meta["training"]["best_epoch"], meta["training"]["best_val_auc"])

    splits = load_splits(
        Path(data_dir),
        config.val_fraction,
        config.internal_test_fraction,
        config.random_seed,
        config.image_size,
    )
    for scan in splits.scans.values():
        log(scan.report())
    for note in splits.notes:
        log(note)
    log(splits.table())
    run_dir.mkdir(parents=True, exist_ok=True)
    if status == "resume":
        _check_same_data(run_dir, splits)
    else:
        config.save(run_dir / "config.json")
        write_json_atomic(run_dir / "splits.json", splits.file_lists())

    keras.utils.set_random_seed(config.random_seed)
    model, callback = _model_and_state(run_dir, config, status)
    start_epoch = callback.state["epochs_done"]
    if status == "resume":
        log(
            f"Resuming {run_dir} after epoch {start_epoch} (best val AUC so far "
            f"{callback.state['best_val_auc']:.4f}, learning rate {callback.state['learning_rate']:.2e})."
        )

    done = callback.state["stopped_early"] or start_epoch >= config.epochs
    if not done:
        _fit(model, splits, config, run_dir, callback, start_epoch, extra_callbacks or [])
    best_epoch, best_auc = _finish(run_dir, config, splits, callback.state, log)
    return TrainResult(run_dir, False, start_epoch, best_epoch, best_auc)


def _model_and_state(run_dir: Path, config: Config, status: str) -> tuple[keras.Model, RunState]:
    if status == "resume":
        checkpoint = run_dir / CHECKPOINT
        model = keras.models.load_model(checkpoint / "model.keras")
        state = json.loads((checkpoint / "state.json").read_text())
        model.optimizer.learning_rate.assign(state["learning_rate"])
        restore_random_state(model, state.get("random_state", {}))
        return model, RunState(run_dir, config, state)
    model = build_model(config)
    compile_model(model, learning_rate_at(config, 0), config.weight_decay, config.label_smoothing)
    return model, RunState(run_dir, config)


def _fit(
    model,
    splits: DataSplits,
    config: Config,
    run_dir: Path,
    callback: RunState,
    start_epoch: int,
    extra_callbacks: list,
) -> None:
    train, val = splits.splits["train"], splits.splits["val"]
    train_labels = np.array([s.label for s in train])
    # One iterator over the remaining epochs, cut into epochs by steps_per_epoch: a fresh
    # iterator per epoch (fit's default) sometimes left the CPU idle for ~10 s before its
    # first batch, which cost a small model's 12 s epoch almost as much again.
    batches = pipeline.training_batches(
        inputs(train),
        train_labels,
        config.batch_size,
        seed=config.random_seed,
        epochs=range(start_epoch, config.epochs),
        augment=config.augment,
    )
    callbacks = [
        callback,
        keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs"), write_graph=False),
        *extra_callbacks,
    ]
    model.fit(
        batches,
        steps_per_epoch=math.ceil(len(train_labels) / config.batch_size),
        validation_data=pipeline.batches(inputs(val), [s.label for s in val], config.batch_size),
        epochs=config.epochs,
        initial_epoch=start_epoch,
        class_weight=class_weights(train_labels) if config.class_weights else None,
        callbacks=callbacks,
        shuffle=False,  # the batches are shuffled by (seed, epoch)
        verbose=1 if sys.stdout.isatty() else 2,
    )


def _finish(
    run_dir: Path, config: Config, splits: DataSplits, state: dict, log: Callable[[str], None]
) -> tuple[int, float]:
    """Best weights -> clean `model.keras` (no optimizer) -> `metadata.json`; drop the checkpoint."""
    model = build_model(config)
    model.load_weights(run_dir / CHECKPOINT / "best.weights.h5")
    save_model_atomic(model, run_dir / "model.keras")
    training = {
        "best_epoch": state["best_epoch"],
        "best_val_auc": state["best_val_auc"],
        "epochs_run": state["epochs_done"],
        "stopped_early": state["stopped_early"],
        "seconds": round(state["seconds"], 1),
        "selected_on": "val AUC",
    }
    meta = metadata_io.build(config, splits.summary(), training)
    meta = _calibrate(model, meta, splits, config, log)
    metadata_io.write(run_dir, meta)
    shutil.rmtree(run_dir / CHECKPOINT, ignore_errors=True)
    log(f"Best epoch {state['best_epoch']} of {state['epochs_done']}: val AUC {state['best_val_auc']:.4f}.")
    return state["best_epoch"], state["best_val_auc"]


def _calibrate(model, meta: dict, splits: DataSplits, config: Config, log) -> dict:
    """Platt calibration and the operating threshold, both fitted on the validation split."""
    samples = splits.splits["val"]
    raw = Bundle(Path("."), model, meta).forward(inputs(samples), config.batch_size)
    fitted = fit_operating_point([s.label for s in samples], raw, config.threshold_rule)
    log(
        f"Calibration: {describe_calibration(fitted['calibration'])}; threshold "
        f"{fitted['threshold']['value']:.4f} ({config.threshold_rule}, chosen on val)."
    )
    return metadata_io.with_operating_point(meta, fitted)
