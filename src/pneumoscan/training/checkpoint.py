"""The per-epoch checkpoint of `pneumoscan train`, and the random state it carries.

After every epoch the whole checkpoint (the model with its optimizer state, the best weights so
far, the run's state with the random state of dropout) is written into a fresh folder, fsynced
and swapped in (`io.replace_dir_atomic`), so the same command resumes after any interruption,
kill -9 included. Every worker saves one (reading variables may need all of them): the chief in
the run folder, the others in a folder of their own. A resumed run restores the chief's on
every worker (`restore`).
"""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np

from pneumoscan.atomic import replace_dir_atomic
from pneumoscan.errors import RunConflict
from pneumoscan.run_folder import BEST_WEIGHTS, MODEL, STATE, RunFolder
from pneumoscan.training.loop import averaged_weights
from pneumoscan.training.progress import write_history
from pneumoscan.training.strategy import Engine


class Checkpoint(keras.callbacks.Callback):
    """Saves the checkpoint into `folder` at the end of every epoch, the best weights when the
    epoch was the best (runs after `progress.BestEpoch`); with `write_history`, then rewrites
    the run's `history.csv` from the state."""

    def __init__(self, folder: RunFolder, state: dict, write_history: bool):
        super().__init__()
        self.folder, self.state, self.write_history = folder, state, write_history

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        final, build = self.folder.checkpoint, self.folder.checkpoint_build
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir()
        self.model.save(build / MODEL)
        if self.state["best_epoch"] == epoch + 1:
            with averaged_weights(self.model):  # what was validated
                self.model.save_weights(build / BEST_WEIGHTS)
        elif (final / BEST_WEIGHTS).exists():  # a worker resumed into a fresh folder has none
            shutil.copy2(final / BEST_WEIGHTS, build / BEST_WEIGHTS)
        self.state["random_state"] = random_state(self.model)
        (build / STATE).write_text(json.dumps(self.state, indent=2))
        replace_dir_atomic(build, final)
        if self.write_history:
            write_history(self.folder.history, self.state["history"])


def restore(model: keras.Model, folder: RunFolder, engine: Engine) -> dict:
    """Put the chief's checkpoint in `folder` (weights, optimizer, dropout's random state) into
    `model` on every worker; returns the run's state.

    Raises:
        RunConflict: the run was trained on another number of replicas (the global batch would
            change), on every worker.
    """
    state = engine.on_chief(lambda: _read_state(folder, engine.replicas))
    variables = [*model.variables, *model.optimizer.variables]
    values = None
    if engine.is_chief:
        saved = keras.models.load_model(folder.checkpoint / MODEL)
        values = [np.asarray(v.numpy()) for v in (*saved.variables, *saved.optimizer.variables)]
    values = engine.broadcast(values or [np.zeros(v.shape, v.dtype) for v in variables])
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)
    model.optimizer.learning_rate.assign(state["learning_rate"])
    restore_random_state(model, state.get("random_state", {}))
    return state


def _read_state(folder: RunFolder, replicas: int) -> dict:
    state = json.loads((folder.checkpoint / STATE).read_text())
    if state.get("replicas", 1) != replicas:
        raise RunConflict(
            f"{folder.path} was trained on {state.get('replicas', 1)} replica(s) and this start has "
            f"{replicas}; the global batch would change. Start it as before, or pass --overwrite."
        )
    return state


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
