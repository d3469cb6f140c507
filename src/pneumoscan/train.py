"""`pneumoscan.train`, kept for the imports that name it: training lives in `pneumoscan.training`
(the run in `training/run.py`). Nothing new belongs here."""

from pneumoscan.errors import RunConflict, WorkerLost
from pneumoscan.run_folder import CHECKPOINT
from pneumoscan.training.batches import left_out_of_training, training_films
from pneumoscan.training.checkpoint import random_state, restore_random_state
from pneumoscan.training.fit import class_weights, compile_model, fit_arrays
from pneumoscan.training.progress import HISTORY_FIELDS, write_history
from pneumoscan.training.run import TrainResult, train
from pneumoscan.training.schedule import learning_rate_at

__all__ = [
    "CHECKPOINT",
    "HISTORY_FIELDS",
    "RunConflict",
    "TrainResult",
    "WorkerLost",
    "class_weights",
    "compile_model",
    "fit_arrays",
    "learning_rate_at",
    "left_out_of_training",
    "random_state",
    "restore_random_state",
    "train",
    "training_films",
    "write_history",
]
