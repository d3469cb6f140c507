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
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pneumoscan import acquisition, loop, ood, pipeline
from pneumoscan import metadata as metadata_io
from pneumoscan.bundle import Bundle
from pneumoscan.calibrate import describe_calibration, fit_operating_point
from pneumoscan.config import Config
from pneumoscan.data import DataSplits, group_ids, inputs, load_splits
from pneumoscan.errors import RunConflict, WorkerLost
from pneumoscan.io import (
    recover_dir,
    replace_dir_atomic,
    save_model_atomic,
    write_bytes_atomic,
    write_json_atomic,
)
from pneumoscan.model import build_model, heatmap_spec
from pneumoscan.strategy import Engine, make_engine

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


@dataclass
class TrainResult:
    run_dir: Path
    already_finished: bool
    resumed_from_epoch: int
    best_epoch: int
    best_val_auc: float
    wrote_run: bool = True  # False on the workers of a multi-worker run other than the chief


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """n / (2 n_c): each class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=2)
    return {c: float(len(labels) / (2 * counts[c])) for c in range(2) if counts[c]}


def learning_rate_at(config: Config, epoch: int, replicas: int = 1) -> float:
    """The scheduled learning rate of 0-based `epoch` (cosine: linear warm-up, then cosine
    decay to zero over the remaining epochs; plateau: the base rate, reduced by RunState),
    times `replicas` (the linear scaling rule: the global batch is `replicas` times larger)."""
    base = config.learning_rate * replicas
    if config.schedule != "cosine":
        return base
    if epoch < config.warmup_epochs:
        return base * (epoch + 1) / (config.warmup_epochs + 1)
    progress = (epoch - config.warmup_epochs) / max(1, config.epochs - config.warmup_epochs)
    return max(0.5 * base * (1.0 + math.cos(math.pi * progress)), config.min_learning_rate * replicas)


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


class RunState(keras.callbacks.Callback):
    """Best-epoch tracking, early stopping, LR reduction on plateau and the atomic checkpoint.

    One object holds all the state that must survive an interruption, so resuming restores
    it exactly (Keras' own callbacks reset theirs in `on_train_begin`).
    """

    def __init__(self, run_dir: Path, config: Config, engine: Engine, state: dict | None = None):
        """`run_dir` is where the checkpoint goes: the run folder on the chief, a worker-local
        folder elsewhere (every worker saves, since reading variables may need all of them)."""
        super().__init__()
        self.run_dir, self.config, self.engine = run_dir, config, engine
        self.state = state or {
            "epochs_done": 0,
            "best_val_auc": -math.inf,
            "best_epoch": 0,
            "epochs_without_improvement": 0,
            "plateau_wait": 0,
            "learning_rate": learning_rate_at(config, 0, engine.replicas),
            "stopped_early": False,
            "history": [],
            "seconds": 0.0,
            "replicas": engine.replicas,
        }
        self._epoch_start = 0.0

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._epoch_start = time.perf_counter()
        if self.config.schedule == "cosine":
            self.state["learning_rate"] = learning_rate_at(self.config, epoch, self.engine.replicas)
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
                    state["learning_rate"] * self.config.plateau_factor,
                    self.config.min_learning_rate * self.engine.replicas,
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
            with loop.averaged_weights(self.model):  # what was validated
                self.model.save_weights(build / "best.weights.h5")
        elif (final / "best.weights.h5").exists():  # a worker resumed into a fresh folder has none
            shutil.copy2(final / "best.weights.h5", build / "best.weights.h5")
        self.state["random_state"] = random_state(self.model)
        (build / "state.json").write_text(json.dumps(self.state, indent=2))
        replace_dir_atomic(build, final)
        if self.engine.is_chief:
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
    """Train `config` on the train split of `data_dir`, selecting on its val split.

    Under `--strategy multi-worker` every worker runs this with the same arguments; the chief
    (worker 0) decides whether the run is new or resumed, hands its checkpoint to the others,
    and alone writes `run_dir` and finishes the run.

    Raises:
        RunConflict: `run_dir` holds another run (on every worker: the chief's verdict).
        StrategyError: the strategy cannot run here.
    """
    config, run_dir = config.resolved(), Path(run_dir)
    engine = make_engine(config.strategy, config.precision)
    decision = engine.broadcast_json(_decide(run_dir, config, overwrite) if engine.is_chief else None)
    if decision["status"] == "conflict":
        raise RunConflict(decision["message"])
    if decision["status"] == "finished":
        log(decision["message"])
        return TrainResult(run_dir, True, 0, decision["best_epoch"], decision["best_val_auc"])

    splits = load_splits(
        Path(data_dir),
        config.val_fraction,
        config.internal_test_fraction,
        config.random_seed,
        config.image_size,
        config.val_design,
        statistics=config.acquisition_reweight > 0,
    )
    for scan in splits.scans.values():
        log(scan.report())
    for note in splits.notes:
        log(note)
    log(splits.table())
    if config.exclude_files:
        log(
            f"Leaving {left_out_of_training(splits, config)} of the {len(config.exclude_files)} film(s) "
            "--exclude-files names out of training; the rest are in val or internal-test, where they "
            "keep their labels, or not in the data."
        )
    if engine.is_chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        if decision["status"] == "resume":
            _check_same_data(run_dir, splits)
        else:
            config.save(run_dir / "config.json")
            write_json_atomic(run_dir / "splits.json", splits.file_lists())

    keras.utils.set_random_seed(config.random_seed)
    # The other workers checkpoint to a folder of their own, removed when training ends.
    checkpoint_dir = (
        run_dir if engine.is_chief else Path(tempfile.mkdtemp(prefix=f"pneumoscan-worker{engine.worker}-"))
    )
    try:
        model, callback = _model_and_state(run_dir, checkpoint_dir, config, engine, decision["status"])
        start_epoch = callback.state["epochs_done"]
        if decision["status"] == "resume":
            log(
                f"Resuming {run_dir} after epoch {start_epoch} (best val AUC so far "
                f"{callback.state['best_val_auc']:.4f}, learning rate {callback.state['learning_rate']:.2e})."
            )
        if not (callback.state["stopped_early"] or start_epoch >= config.epochs):
            _fit(model, splits, config, engine, run_dir, callback, start_epoch, extra_callbacks or [])
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError) as error:
        if engine.workers == 1:
            raise
        raise WorkerLost(
            "another worker of the cluster stopped or cannot be reached; start the same command on "
            "every worker again: training continues after the last saved epoch."
        ) from error
    finally:
        if not engine.is_chief:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if not engine.is_chief:
        state = callback.state
        return TrainResult(
            run_dir, False, start_epoch, state["best_epoch"], state["best_val_auc"], wrote_run=False
        )
    best_epoch, best_auc = _finish(run_dir, config, splits, callback.state, engine, log)
    return TrainResult(run_dir, False, start_epoch, best_epoch, best_auc)


def _decide(run_dir: Path, config: Config, overwrite: bool) -> dict:
    """The chief's verdict on `run_dir`: new, resume (with the checkpoint's state), finished or a
    conflict, as a JSON-able dict every worker receives."""
    try:
        status = check_existing_run(run_dir, config, overwrite)
    except RunConflict as error:
        return {"status": "conflict", "message": str(error)}
    if status == "finished":
        training = metadata_io.read(run_dir)["training"]
        message = (
            f"{run_dir} already holds a finished run (best epoch {training['best_epoch']}, "
            f"val AUC {training['best_val_auc']:.4f}); nothing to do."
        )
        return {
            "status": status,
            "message": message,
            **{k: training[k] for k in ("best_epoch", "best_val_auc")},
        }
    return {"status": status}


def _model_and_state(
    run_dir: Path, checkpoint_dir: Path, config: Config, engine: Engine, status: str
) -> tuple[keras.Model, RunState]:
    """The compiled model in the strategy's scope, and the run state: fresh, or the chief's
    checkpoint (weights, optimizer, dropout's random state) handed to every worker."""
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
    if status != "resume":
        return model, RunState(checkpoint_dir, config, engine)
    variables = [*model.variables, *model.optimizer.variables]
    state, values = _read_checkpoint(run_dir, engine) if engine.is_chief else (None, None)
    state = engine.broadcast_json(state)
    if "conflict" in state:
        raise RunConflict(state["conflict"])
    values = engine.broadcast(values or [np.zeros(v.shape, v.dtype) for v in variables])
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)
    model.optimizer.learning_rate.assign(state["learning_rate"])
    restore_random_state(model, state.get("random_state", {}))
    return model, RunState(checkpoint_dir, config, engine, state)


def _read_checkpoint(run_dir: Path, engine: Engine) -> tuple[dict, list[np.ndarray] | None]:
    """The chief's checkpoint: its state and the values of the model's and optimizer's variables
    (in the order a freshly built model lists them), or `{"conflict": why}`."""
    checkpoint = run_dir / CHECKPOINT
    state = json.loads((checkpoint / "state.json").read_text())
    if state.get("replicas", 1) != engine.replicas:
        why = (
            f"{run_dir} was trained on {state.get('replicas', 1)} replica(s) and this start has "
            f"{engine.replicas}; the global batch would change. Start it as before, or pass --overwrite."
        )
        return {"conflict": why}, None
    saved = keras.models.load_model(checkpoint / "model.keras")
    return state, [np.asarray(v.numpy()) for v in (*saved.variables, *saved.optimizer.variables)]


def _fit(
    model,
    splits: DataSplits,
    config: Config,
    engine: Engine,
    run_dir: Path,
    callback: RunState,
    start_epoch: int,
    extra_callbacks: list,
) -> None:
    train, val = training_films(splits, config), splits.splits["val"]
    train_images, train_labels = inputs(train), np.array([s.label for s in train])
    val_images, val_labels = inputs(val), [s.label for s in val]
    weights = None
    if config.acquisition_reweight > 0:
        weights = acquisition.balancing_weights(
            np.stack([s.statistics for s in train]),
            train_labels,
            group_ids(train),
            config.random_seed,
            config.acquisition_reweight,
        )
    replicas = engine.replicas
    global_batch = config.batch_size * replicas
    # With several replicas the last, short batch is dropped: a replica must not get none.
    drop_remainder = replicas > 1
    steps = (
        len(train_labels) // global_batch if drop_remainder else math.ceil(len(train_labels) / global_batch)
    )

    def train_batches(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return pipeline.training_batches(
            train_images,
            train_labels,
            global_batch,
            seed=config.random_seed,
            epochs=range(start_epoch, config.epochs),
            augment=config.augment,
            replicas=_replicas_of(context, replicas),
            drop_remainder=drop_remainder,
            weights=weights,
        )

    def val_batches(context: tf.distribute.InputContext) -> tf.data.Dataset:
        return pipeline.batches(
            val_images, val_labels, global_batch, replicas=_replicas_of(context, replicas)
        )

    callbacks = [callback, *extra_callbacks]
    if engine.is_chief:
        callbacks.insert(1, keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs"), write_graph=False))
    loop.fit(
        model,
        engine,
        train_batches,
        val_batches,
        loop.Epochs(start_epoch, config.epochs, steps),
        class_weights(train_labels) if config.class_weights else None,
        config.label_smoothing,
        callbacks,
        loop.Mixup(config.mixup, config.random_seed),
    )


def training_films(splits: DataSplits, config: Config) -> list:
    """The train split less the films `config.exclude_files` names."""
    excluded = set(config.exclude_files)
    return [sample for sample in splits.splits["train"] if sample.relpath not in excluded]


def left_out_of_training(splits: DataSplits, config: Config) -> int:
    """How many films of the train split `config.exclude_files` leaves out."""
    return len(splits.splits["train"]) - len(training_films(splits, config))


def _replicas_of(context: tf.distribute.InputContext, replicas: int) -> tuple[int, int, int]:
    """(first, local, total) replicas served by this input pipeline: one pipeline a worker, each
    serving its worker's local replicas in turn."""
    local = replicas // context.num_input_pipelines
    return context.input_pipeline_id * local, local, replicas


def _finish(
    run_dir: Path, config: Config, splits: DataSplits, state: dict, engine: Engine, log: Callable[[str], None]
) -> tuple[int, float]:
    """Best weights -> clean `model.keras` (no optimizer) -> `metadata.json`; drop the checkpoint."""
    keras.mixed_precision.set_global_policy("float32")  # the saved model is float32 (TF.js needs it)
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
        "strategy": engine.name,
        "replicas": engine.replicas,
        "global_batch_size": config.batch_size * engine.replicas,
        "excluded_from_training": left_out_of_training(splits, config),
    }
    meta = {**metadata_io.build(config, splits.summary(), training), "heatmap": heatmap_spec(model)}
    meta = _calibrate(model, meta, splits, config, log)
    meta = _fit_trust(model, meta, splits, config, log)
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


def _fit_trust(model, meta: dict, splits: DataSplits, config: Config, log) -> dict:
    """The out-of-distribution flag (statistics on the training split, threshold on val) and
    the borderline band (val), around the calibration and threshold just fitted."""
    bundle = Bundle(Path("."), model, meta)
    meta = ood.refit(bundle, splits.splits["train"], splits.splits["val"], config.batch_size)
    log(ood.describe(meta))
    return meta
