"""The end of a run of `pneumoscan train`: the best weights into a clean `model.keras`,
calibration and threshold, the out-of-distribution flag and borderline band, `metadata.json`;
then the checkpoint goes. Only the chief finishes.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import keras

from pneumoscan import metadata as metadata_io
from pneumoscan.atomic import save_model_atomic
from pneumoscan.bundle import Bundle
from pneumoscan.config import Config
from pneumoscan.data import DataSplits
from pneumoscan.decision import fit_on_splits, with_decision
from pneumoscan.model import build_model, heatmap_spec
from pneumoscan.run_folder import BEST_WEIGHTS, RunFolder
from pneumoscan.training.batches import left_out_of_training
from pneumoscan.training.strategy import Engine


def finish(
    folder: RunFolder,
    config: Config,
    splits: DataSplits,
    state: dict,
    engine: Engine,
    log: Callable[[str], None],
) -> None:
    """Best weights -> clean `model.keras` (no optimizer) -> `metadata.json`; drop the checkpoint."""
    keras.mixed_precision.set_global_policy("float32")  # the saved model is float32 (TF.js needs it)
    model = build_model(config)
    model.load_weights(folder.checkpoint / BEST_WEIGHTS)
    save_model_atomic(model, folder.model)
    meta = {
        **metadata_io.build(config, splits.summary(), _training_block(config, splits, state, engine)),
        "heatmap": heatmap_spec(model),
    }
    meta = _fit_decision(folder, model, meta, splits, config, log)
    metadata_io.write(folder.path, meta)
    shutil.rmtree(folder.checkpoint, ignore_errors=True)
    log(f"Best epoch {state['best_epoch']} of {state['epochs_done']}: val AUC {state['best_val_auc']:.4f}.")


def _training_block(config: Config, splits: DataSplits, state: dict, engine: Engine) -> dict:
    """metadata.json's `training` block."""
    return {
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


def _fit_decision(folder: RunFolder, model, meta: dict, splits: DataSplits, config: Config, log) -> dict:
    """The decision, each block fitted once (`decision.fit_on_splits`): Platt calibration, the
    operating threshold and the borderline band on the val split, the out-of-distribution
    statistics on the train split with their threshold on val."""
    bundle = Bundle(folder.path, model, meta)
    fitted, metrics = fit_on_splits(
        bundle, splits.splits["train"], splits.splits["val"], config.batch_size, config.threshold_rule
    )
    log(fitted.describe())
    return with_decision(meta, fitted, metrics)
