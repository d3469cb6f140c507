"""pneumoscan.run_folder: the run folder's file names (a contract every stage reads) and the
verdict on a folder: new, resume, finished or conflict."""

from __future__ import annotations

import json
import math

import pytest

from pneumoscan import run_folder
from pneumoscan.config import Config
from pneumoscan.errors import RunConflict
from pneumoscan.run_folder import CONFLICT, FINISHED, NEW, RESUME, RunFolder, Verdict

CONFIG = Config(arch="seed", image_size=64, epochs=3, batch_size=8, random_seed=1).resolved()


def _started(path, config: Config = CONFIG, epochs_done: int = 1):
    """A run folder as training leaves it after `epochs_done` epochs."""
    folder = RunFolder(path)
    folder.checkpoint.mkdir(parents=True)
    config.save(folder.config)
    folder.splits.write_text(json.dumps({"rule": {}, "splits": {"train": [["NORMAL/a.png", "00"]]}}))
    (folder.checkpoint / run_folder.STATE).write_text(json.dumps({"epochs_done": epochs_done}))
    return folder


def test_the_file_names_are_those_of_every_run_folder_made_so_far():
    # Folders made before run_folder.py existed must keep loading and resuming: these names are
    # a contract with them, with exported bundles and with the web page.
    names = {
        "MODEL": "model.keras",
        "METADATA": "metadata.json",
        "CONFIG": "config.json",
        "HISTORY": "history.csv",
        "SPLITS": "splits.json",
        "LOGS": "logs",
        "CHECKPOINT": "checkpoint",
        "BEST_WEIGHTS": "best.weights.h5",
        "STATE": "state.json",
    }
    assert {name: getattr(run_folder, name) for name in names} == names
    folder = RunFolder("runs/a")
    assert folder.checkpoint_build.name == ".checkpoint.new" and folder.model.parent.name == "a"


def test_a_missing_or_empty_folder_is_new(tmp_path):
    assert RunFolder(tmp_path / "missing").verdict(CONFIG) == Verdict(NEW)
    (tmp_path / "empty").mkdir()
    assert RunFolder(tmp_path / "empty").status(CONFIG) == NEW


def test_a_folder_of_other_files_is_a_conflict_and_is_left_alone(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    verdict = RunFolder(tmp_path).verdict(CONFIG, overwrite=True)
    assert verdict.status == CONFLICT and "holds no pneumoscan run" in verdict.message
    assert (tmp_path / "thesis.tex").read_text() == "mine"


def test_a_run_with_a_checkpoint_resumes_and_one_without_starts_anew(tmp_path):
    folder = _started(tmp_path / "run")
    assert folder.status(CONFIG) == RESUME
    (folder.checkpoint / run_folder.STATE).unlink()
    assert folder.status(CONFIG) == NEW


def test_a_config_recorded_before_recipe_fields_existed_resumes(tmp_path):
    folder = _started(tmp_path / "run")
    recorded = json.loads(folder.config.read_text())
    for name in ("warmup_epochs", "weight_decay", "label_smoothing", "schedule"):
        recorded.pop(name)  # an older run held the recipe's value implicitly
    folder.config.write_text(json.dumps(recorded))
    assert folder.status(CONFIG) == RESUME


def test_a_crash_inside_the_checkpoint_swap_is_recovered_then_resumed(tmp_path):
    folder = _started(tmp_path / "run")
    folder.checkpoint.rename(tmp_path / "run" / ".checkpoint.old")  # between the two renames
    assert not folder.checkpoint.exists()
    assert folder.status(CONFIG) == RESUME and folder.has_checkpoint()


def test_another_configuration_is_a_conflict_that_names_the_difference(tmp_path):
    folder = _started(tmp_path / "run")
    other = Config(arch="seed", image_size=64, epochs=4, batch_size=8, random_seed=1).resolved()
    verdict = folder.verdict(other)
    assert verdict.status == CONFLICT
    assert "different configuration (epochs: 3 -> 4)" in verdict.message and "--overwrite" in verdict.message
    with pytest.raises(RunConflict, match="epochs: 3 -> 4"):
        folder.status(other)
    assert folder.verdict(other, overwrite=True) == Verdict(NEW)  # cleared: starts over
    assert not folder.config.exists() and not folder.checkpoint.exists()


def test_overwrite_removes_the_run_files_and_nothing_else(tmp_path):
    folder = _started(tmp_path / "run")
    for path in (folder.model, folder.metadata, folder.history):
        path.write_text("x")
    folder.logs.mkdir()
    folder.checkpoint_build.mkdir()
    (folder.path / "notes.txt").write_text("mine")
    folder.clear()
    assert sorted(p.name for p in folder.path.iterdir()) == ["notes.txt"]


def test_resuming_on_other_data_is_refused(tmp_path):
    folder = _started(tmp_path / "run")
    same = json.loads(folder.splits.read_text())
    folder.check_same_splits(same, tmp_path / "data")
    other = {"splits": {"train": [["NORMAL/b.png", "11"]]}}
    with pytest.raises(RunConflict, match=r"the train split of .*data differs from the one this run"):
        folder.check_same_splits(other, tmp_path / "data")


def test_a_finished_run_is_finished_with_its_figures(trained_run):
    _, run_dir = trained_run
    verdict = RunFolder(run_dir).verdict(
        Config(arch="seed", image_size=64, epochs=2, batch_size=8, random_seed=1)
    )
    training = json.loads((run_dir / run_folder.METADATA).read_text())["training"]
    assert verdict.status == FINISHED and verdict.best_epoch == training["best_epoch"]
    assert math.isclose(verdict.best_val_auc, training["best_val_auc"])
    assert f"best epoch {training['best_epoch']}" in verdict.message and "nothing to do" in verdict.message
    assert Verdict.from_json(json.loads(json.dumps(verdict.to_json()))) == verdict
