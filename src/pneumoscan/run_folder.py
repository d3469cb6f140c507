"""The run folder of `pneumoscan train --out RUN_DIR`: its file names, and its verdict.

A finished run folder holds

    model.keras      the best epoch's model (by validation AUC), without optimizer
    metadata.json    what the model is and how to use it (`metadata.py`, docs/metadata.md)
    config.json      the resolved configuration it was trained with
    history.csv      one row per epoch
    splits.json      every file of every split, as [relpath, sha256[:16]]
    logs/            TensorBoard

and, while training, `checkpoint/` (`model.keras` with optimizer state, `best.weights.h5`,
`state.json`), swapped in whole after each epoch (`io.replace_dir_atomic`, which may leave
`.checkpoint.new` or `.checkpoint.old` after a crash). An exported bundle and a run folder share
`model.keras`, `metadata.json` and `splits.json`: `bundle`, `evaluate`, `export` and `report`
read them by these names. The verdict on a folder (`RunFolder.verdict`) says whether `train`
starts it, resumes it, leaves it alone (finished) or refuses it (conflict).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from pneumoscan import metadata as metadata_io
from pneumoscan.atomic import recover_dir
from pneumoscan.config import Config
from pneumoscan.errors import RunConflict

MODEL = "model.keras"
METADATA = metadata_io.FILE_NAME
CONFIG = "config.json"
HISTORY = "history.csv"
SPLITS = "splits.json"
LOGS = "logs"
CHECKPOINT = "checkpoint"
# Inside the checkpoint folder (MODEL too, there with its optimizer state).
BEST_WEIGHTS = "best.weights.h5"
STATE = "state.json"

NEW, RESUME, FINISHED, CONFLICT = "new", "resume", "finished", "conflict"


@dataclass(frozen=True)
class Verdict:
    """What `train` does with a folder, as the chief decides it and every worker receives it
    (`to_json`): `status` is NEW, RESUME, FINISHED or CONFLICT; `message` says why for the last
    two; a finished run's best epoch and its val AUC."""

    status: str
    message: str = ""
    best_epoch: int = 0
    best_val_auc: float = float("nan")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict) -> Verdict:
        return cls(**value)


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (or of a worker's own checkpoint folder)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def model(self) -> Path:
        return self.path / MODEL

    @property
    def metadata(self) -> Path:
        return self.path / METADATA

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def history(self) -> Path:
        return self.path / HISTORY

    @property
    def splits(self) -> Path:
        return self.path / SPLITS

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def checkpoint_build(self) -> Path:
        """Where the next checkpoint is written before it is swapped in."""
        return self.path / f".{CHECKPOINT}.new"

    def is_finished(self) -> bool:
        return self.metadata.exists() and self.model.exists()

    def has_checkpoint(self) -> bool:
        return (self.checkpoint / STATE).exists()

    def clear(self) -> None:
        """Remove every file a run writes (`--overwrite`), and nothing else."""
        for path in (self.model, self.metadata, self.config, self.history, self.splits):
            path.unlink(missing_ok=True)
        for path in (self.checkpoint, self.logs, self.checkpoint_build, self.path / f".{CHECKPOINT}.old"):
            shutil.rmtree(path, ignore_errors=True)

    def status(self, config: Config, overwrite: bool = False) -> str:
        """NEW, RESUME or FINISHED for a run of the resolved `config`.

        Raises:
            RunConflict: the folder holds a run with another configuration, or files that are
                not a run.
        """
        recover_dir(self.checkpoint, self.checkpoint_build)  # a crash inside the last swap
        if overwrite and self.path.exists():
            self.clear()
        if not self.config.exists():
            if self.path.exists() and any(self.path.iterdir()):
                raise RunConflict(
                    f"{self.path}: folder is not empty and holds no pneumoscan run; "
                    "choose another --out or pass --overwrite."
                )
            return NEW
        # Resolved: a run recorded before a recipe field existed holds the recipe value implicitly.
        differences = Config.load(self.config).resolved().differences(config.resolved())
        if differences:
            raise RunConflict(
                f"{self.path} holds a run with a different configuration ("
                + "; ".join(differences)
                + "); pass --overwrite to start over."
            )
        if self.is_finished():
            return FINISHED
        return RESUME if self.has_checkpoint() else NEW

    def check_same_splits(self, file_lists: dict, root: Path) -> None:
        """Refuse to resume on other data: `file_lists` (`DataSplits.file_lists()` of `root`)
        must hold the splits this run was started on (its splits.json).

        Raises:
            RunConflict: a split differs.
        """
        saved = json.loads(self.splits.read_text())
        for name in saved["splits"]:
            if saved["splits"][name] != file_lists["splits"].get(name):
                raise RunConflict(
                    f"{self.path}: the {name} split of {root} differs from the one "
                    "this run was started on; pass --overwrite to start over."
                )

    def verdict(self, config: Config, overwrite: bool = False) -> Verdict:
        """`status` as a `Verdict`, a conflict included, with a finished run's figures."""
        try:
            status = self.status(config, overwrite)
        except RunConflict as error:
            return Verdict(CONFLICT, str(error))
        if status != FINISHED:
            return Verdict(status)
        training = metadata_io.read(self.path)["training"]
        message = (
            f"{self.path} already holds a finished run (best epoch {training['best_epoch']}, "
            f"val AUC {training['best_val_auc']:.4f}); nothing to do."
        )
        return Verdict(status, message, training["best_epoch"], training["best_val_auc"])
