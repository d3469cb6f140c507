"""`pneumoscan train --data DIR --out RUN_DIR`: one run, read top to bottom in `train`.

The chief's verdict on the run folder (`run_folder`: new, resume, finished or a conflict) ->
the fixed splits of the data, the same on every worker -> the model, new or restored from the
checkpoint -> the fit, checkpointed after every epoch -> the finish (`finish`). Data order and
augmentation are functions of (seed, epoch), so a resumed run trains the epochs an
uninterrupted run would have trained.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from pneumoscan.atomic import write_json_atomic
from pneumoscan.config import Config
from pneumoscan.data import DataSplits, load_splits
from pneumoscan.errors import DataError, PneumoscanError, RunConflict, WorkerLost
from pneumoscan.run_folder import CONFLICT, FINISHED, RESUME, RunFolder, Verdict
from pneumoscan.training import checkpoint
from pneumoscan.training.batches import left_out_of_training, run_arrays
from pneumoscan.training.finish import finish
from pneumoscan.training.fit import fit_arrays, new_model
from pneumoscan.training.progress import epoch_callbacks, new_state
from pneumoscan.training.strategy import Engine, make_engine


@dataclass
class TrainResult:
    run_dir: Path
    already_finished: bool
    resumed_from_epoch: int
    best_epoch: int
    best_val_auc: float
    wrote_run: bool = True  # False on the workers of a multi-worker run other than the chief


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
    decides whether the run is new or resumed, hands its checkpoint to the others, and alone
    writes `run_dir` and finishes the run.

    Raises:
        RunConflict: `run_dir` holds another run, or a worker was given other data or another
            configuration (on every worker, in the same sentence).
        StrategyError: the strategy cannot run here.
        WorkerLost: a worker stopped.
    """
    config, folder = config.resolved(), RunFolder(run_dir)
    engine = make_engine(config.strategy, config.precision)
    with _a_lost_worker_is_one_sentence(engine):
        verdict = Verdict.from_json(engine.on_chief(lambda: folder.verdict(config, overwrite).to_json()))
        if verdict.status == CONFLICT:
            raise RunConflict(verdict.message)
        if verdict.status == FINISHED:
            log(verdict.message)
            return TrainResult(folder.path, True, 0, verdict.best_epoch, verdict.best_val_auc)
        splits = split(Path(data_dir), config, engine, log)
        engine.on_chief(lambda: _record(folder, config, splits, verdict.status))
        keras.utils.set_random_seed(config.random_seed)
        model, state = _model(folder, config, engine, verdict.status, log)
        first_epoch = state["epochs_done"]
        if not (state["stopped_early"] or first_epoch >= config.epochs):
            _fit(model, splits, config, engine, folder, state, extra_callbacks or [])
    if engine.is_chief:
        finish(folder, config, splits, state, engine, log)
    best = (state["best_epoch"], state["best_val_auc"])
    return TrainResult(folder.path, False, first_epoch, *best, wrote_run=engine.is_chief)


def split(data_dir: Path, config: Config, engine: Engine, log: Callable[[str], None]) -> DataSplits:
    """The fixed splits of `data_dir`, said in the log; under several workers, checked to be
    the chief's on every worker before the first step (`same_on_every_worker`).

    Raises:
        DataError: a worker's data cannot be used (on every worker).
        RunConflict: a worker's data or configuration differs from the chief's (on every worker).
    """
    try:
        splits, word = _load_splits(data_dir, config, log), None
    except PneumoscanError as error:
        if engine.workers == 1:
            raise
        splits, word = None, {"task": engine.task, "error": str(error)}
    same_on_every_worker(engine, word or _word(engine, config, splits))
    return splits


def _load_splits(data_dir: Path, config: Config, log: Callable[[str], None]) -> DataSplits:
    splits = load_splits(
        data_dir,
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
    return splits


def _word(engine: Engine, config: Config, splits: DataSplits) -> dict:
    """What a worker trains on: its configuration and a digest of each split's files in order."""
    files = splits.file_lists()["splits"]
    digests = {name: hashlib.sha256(json.dumps(files[name]).encode()).hexdigest() for name in files}
    return {"task": engine.task, "config": config.to_dict(), "splits": digests}


def same_on_every_worker(engine: Engine, word: dict) -> None:
    """Compare every worker's `word` (`_word`, or `{"task", "error"}`) with the chief's; on any
    difference every worker raises the same sentence, naming the worker whose data differs.

    Raises:
        DataError: a worker could not read its data.
        RunConflict: a worker's configuration or splits differ from the chief's.
    """
    words = engine.gather_json(word)
    for theirs in words:
        if "error" in theirs:
            raise DataError(f"{theirs['task']} of the cluster cannot train: {theirs['error']}")
    chief = words[0]
    for theirs in words[1:]:
        differences = Config.from_dict(chief["config"]).differences(Config.from_dict(theirs["config"]))
        if differences:
            raise RunConflict(
                f"{theirs['task']} was started with another configuration than {chief['task']} "
                f"({'; '.join(differences)}); start the same command on every worker."
            )
        differ = [name for name in chief["splits"] if theirs["splits"].get(name) != chief["splits"][name]]
        if differ or set(theirs["splits"]) != set(chief["splits"]):
            raise RunConflict(
                f"{theirs['task']}'s data differs from that of {chief['task']} (its "
                f"{', '.join(differ or sorted(theirs['splits']))} split(s) hold other files or another "
                "order); give every worker the same --data."
            )


def _record(folder: RunFolder, config: Config, splits: DataSplits, status: str) -> None:
    """The chief's: a new run records its configuration and splits; a resumed one must be
    on the data it was started on."""
    folder.path.mkdir(parents=True, exist_ok=True)
    if status == RESUME:
        folder.check_same_splits(splits.file_lists(), splits.root)
    else:
        config.save(folder.config)
        write_json_atomic(folder.splits, splits.file_lists())


def _model(
    folder: RunFolder, config: Config, engine: Engine, status: str, log: Callable[[str], None]
) -> tuple[keras.Model, dict]:
    """The compiled model and the run's state: fresh, or the chief's checkpoint on every worker."""
    model = new_model(config, engine)
    if status != RESUME:
        return model, new_state(config, engine.replicas)
    state = checkpoint.restore(model, folder, engine)
    log(
        f"Resuming {folder.path} after epoch {state['epochs_done']} (best val AUC so far "
        f"{state['best_val_auc']:.4f}, learning rate {state['learning_rate']:.2e})."
    )
    return model, state


def _fit(
    model: keras.Model,
    splits: DataSplits,
    config: Config,
    engine: Engine,
    folder: RunFolder,
    state: dict,
    extra_callbacks: list,
) -> None:
    """Train from the state's epoch on, checkpointing after each: the chief into the run folder
    (and TensorBoard logs), the others into a folder of their own, removed at the end."""
    with _checkpoint_folder(folder, engine) as own:
        callbacks = [
            *epoch_callbacks(config, engine.replicas, state),
            checkpoint.Checkpoint(own, state, engine.is_chief),
        ]
        if engine.is_chief:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(folder.logs), write_graph=False))
        train_arrays, val_arrays = run_arrays(splits, config)
        fit_arrays(
            model,
            engine,
            train_arrays,
            val_arrays,
            config,
            [*callbacks, *extra_callbacks],
            state["epochs_done"],
        )


@contextmanager
def _checkpoint_folder(folder: RunFolder, engine: Engine) -> Iterator[RunFolder]:
    if engine.is_chief:
        yield folder
        return
    path = Path(tempfile.mkdtemp(prefix=f"pneumoscan-worker{engine.worker}-"))
    try:
        yield RunFolder(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _a_lost_worker_is_one_sentence(engine: Engine) -> Iterator[None]:
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError) as error:
        if engine.workers == 1:
            raise
        raise WorkerLost(
            "another worker of the cluster stopped or cannot be reached; start the same command on "
            "every worker again: training continues after the last saved epoch."
        ) from error
