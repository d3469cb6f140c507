"""pneumoscan.train: a complete run folder, refusing changed configs, and resuming (kill -9 too)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import AWKWARD_BAD, AWKWARD_VALID, REPO, write_awkward
from pneumoscan import metadata as metadata_io
from pneumoscan.cli import main
from pneumoscan.config import Config
from pneumoscan.train import CHECKPOINT, RunConflict, class_weights, train

TINY = {"arch": "seed", "image_size": 64, "batch_size": 8, "random_seed": 1}
RUN_FILES = {"model.keras", "metadata.json", "config.json", "history.csv", "splits.json", "logs"}


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def test_class_weights_balance_the_classes():
    import numpy as np

    weights = class_weights(np.array([0] * 10 + [1] * 30))
    assert weights == {0: 2.0, 1: pytest.approx(2 / 3)}
    assert 10 * weights[0] == pytest.approx(30 * weights[1])


def test_one_epoch_makes_a_complete_run_folder(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    result = train(Config(epochs=1, **TINY), tiny_dataset, run_dir)
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    meta = metadata_io.read(run_dir)
    assert meta["input"] == {
        "height": 64,
        "width": 64,
        "channels": 1,
        "dtype": "float32",
        "color_mode": "grayscale",
        "value_range": [0, 255],
    }
    assert meta["class_names"] == ["NORMAL", "PNEUMONIA"] and meta["arch"] == "seed"
    assert meta["training"]["best_epoch"] == result.best_epoch == 1
    assert [s["op"] for s in meta["preprocessing"]] == [
        "decode",
        "to_uint8",
        "grayscale",
        "resize",
        "model_input",
    ]
    splits = meta["data"]["splits"]
    assert sum(sum(s["counts"].values()) for s in splits.values()) == 48
    assert Config.load(run_dir / "config.json") == Config(epochs=1, **TINY).resolved()
    listed = json.loads((run_dir / "splits.json").read_text())["splits"]
    assert {k: len(v) for k, v in listed.items()} == {k: sum(v["counts"].values()) for k, v in splits.items()}
    assert [row["epoch"] for row in _history(run_dir)] == ["1"]
    model = keras.models.load_model(run_dir / "model.keras")
    assert model.input_shape == (None, 64, 64, 1) and not getattr(model, "optimizer", None)


def test_finished_run_is_left_alone_and_changed_config_refused(tiny_dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(tiny_dataset),
        "--out",
        str(run_dir),
        "--epochs",
        "1",
        "--image-size",
        "64",
        "--batch-size",
        "8",
        "--seed",
        "1",
    ]
    assert main(args) == 0
    stamp = (run_dir / "model.keras").stat().st_mtime_ns
    assert main(args) == 0
    assert "already holds a finished run" in capsys.readouterr().out
    assert (run_dir / "model.keras").stat().st_mtime_ns == stamp

    changed = [a if a != "1" or i != args.index("--epochs") + 1 else "2" for i, a in enumerate(args)]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "different configuration (epochs: 1 -> 2)" in err and "Traceback" not in err
    assert main([*changed, "--overwrite"]) == 0
    assert len(_history(run_dir)) == 2


def test_non_run_folder_is_not_overwritten(tiny_dataset, tmp_path):
    run_dir = tmp_path / "precious"
    run_dir.mkdir()
    (run_dir / "thesis.txt").write_text("keep me")
    with pytest.raises(RunConflict, match="holds no pneumoscan run"):
        train(Config(epochs=1, **TINY), tiny_dataset, run_dir)
    assert (run_dir / "thesis.txt").read_text() == "keep me"


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, after_epoch: int):
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.after_epoch:
            raise KeyboardInterrupt


class _Probe(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.iterations = int(self.model.optimizer.iterations.numpy())
        self.learning_rate = float(self.model.optimizer.learning_rate.numpy())


def test_resume_restores_optimizer_and_callback_state(tiny_dataset, tmp_path):
    config = Config(epochs=5, plateau_patience=1, early_stopping_patience=5, **TINY)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config, tiny_dataset, run_dir, extra_callbacks=[_Interrupt(after_epoch=3)])
    saved = json.loads((run_dir / CHECKPOINT / "state.json").read_text())
    assert saved["epochs_done"] == 3 and not (run_dir / "metadata.json").exists()

    probe = _Probe()
    result = train(config, tiny_dataset, run_dir, extra_callbacks=[probe])
    n_train = len(json.loads((run_dir / "splits.json").read_text())["splits"]["train"])
    steps_per_epoch = -(-n_train // 8)  # ceil
    assert result.resumed_from_epoch == 3
    assert probe.iterations == 3 * steps_per_epoch
    assert probe.learning_rate == pytest.approx(saved["learning_rate"])
    rows = _history(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert len(rows) >= 4
    meta = metadata_io.read(run_dir)
    assert meta["training"]["best_val_auc"] >= saved["best_val_auc"]
    assert not (run_dir / CHECKPOINT).exists()


class _LastWeights(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        self.weights = [w.copy() for w in self.model.get_weights()]
        self.weights += [np.array(v) for v in self.model.optimizer.variables]


class _Optimizer(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        optimizer = self.model.optimizer
        self.iterations = int(optimizer.iterations.numpy())
        self.trained = [np.array(v) for v in optimizer._trainable_variables]
        self.averages = [np.array(v) for v in getattr(optimizer, "_model_variables_moving_average", [])]


def test_with_a_weight_average_the_average_is_what_is_kept(tiny_dataset, tmp_path):
    probe = _Optimizer()
    config = Config(epochs=1, weight_average_momentum=0.5, **TINY)
    train(config, tiny_dataset, tmp_path / "run", extra_callbacks=[probe], log=lambda _: None)
    saved = keras.saving.load_model(tmp_path / "run" / "model.keras")
    kept = [np.array(v) for v in saved.trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(kept, probe.averages, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(kept, probe.trained, strict=True))


def test_excluded_files_are_left_out_of_training_only(tiny_dataset, tmp_path):
    named = sorted(f"NORMAL/{p.name}" for p in (tiny_dataset / "NORMAL").iterdir())[::2]
    probe, said = _Optimizer(), []
    config = Config(epochs=2, exclude_files=(*named, "NORMAL/absent.jpeg"), **TINY)
    train(config, tiny_dataset, tmp_path / "run", extra_callbacks=[probe], log=said.append)
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())["splits"]
    in_train = [name for name, _ in splits["train"] if name in named]
    excluded = metadata_io.read(tmp_path / "run")["training"]["excluded_from_training"]
    assert in_train and excluded == len(in_train)
    assert probe.iterations == 2 * -(-(len(splits["train"]) - len(in_train)) // 8)
    assert f"Leaving {len(in_train)} of the {len(named) + 1} film(s) --exclude-files names" in "\n".join(said)


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes",
    [
        {"arch": "seed"},
        {"arch": "pneumonet"},
        {"arch": "pneumonet", "mixup": 0.4, "weight_average_momentum": 0.9},
    ],
    ids=["seed", "pneumonet", "pneumonet-mixup-averaged"],
)
def test_an_interrupted_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_dataset, tmp_path, changes):
    """Data order, augmentation, dropout masks and mixup's blends of the resumed epochs are the
    ones the uninterrupted run drew, and the moving average of the weights goes on from where it
    was: the last weights are equal bit for bit (TensorFlow's CPU kernels are deterministic here:
    two uninterrupted runs agree bit for bit too)."""
    config = Config(epochs=4, early_stopping_patience=10, **{**TINY, **changes})
    last = {}
    for name, interrupt_after in (("whole", None), ("again", None), ("resumed", 2)):
        run_dir = tmp_path / name
        if interrupt_after:
            with pytest.raises(KeyboardInterrupt):
                train(
                    config, tiny_dataset, run_dir, extra_callbacks=[_Interrupt(after_epoch=interrupt_after)]
                )
        probe = _LastWeights()
        train(config, tiny_dataset, run_dir, extra_callbacks=[probe], log=lambda _: None)
        last[name] = probe.weights
    for reference, other in ((last["whole"], last["again"]), (last["whole"], last["resumed"])):
        assert all(np.array_equal(a, b) for a, b in zip(reference, other, strict=True))


@pytest.mark.slow
def test_kill_9_then_same_command_resumes(tiny_dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(tiny_dataset),
        "--out",
        str(run_dir),
        "--epochs",
        "40",
        "--image-size",
        "150",
        "--batch-size",
        "8",
        "--seed",
        "1",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumoscan", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = run_dir / CHECKPOINT / "state.json"
    deadline = time.monotonic() + 180
    while not state.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state.exists(), "the training process wrote no checkpoint"
    assert not (run_dir / "metadata.json").exists()
    done = json.loads(state.read_text())["epochs_done"]

    assert main(args) == 0
    assert f"Resuming {run_dir} after epoch {done}" in capsys.readouterr().out
    rows = _history(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert len(rows) > done
    metadata_io.read(run_dir)


@pytest.mark.slow
def test_killed_anywhere_even_inside_the_checkpoint_swap_every_restart_continues():
    """benchmarks/robustness/fault_injection.py: SIGKILL after the atomic exchange, twice between the two
    renames of the fallback swap, and once at a random moment; each restart resumes where the
    last checkpoint left it, and the finished run equals an uninterrupted one bit for bit.
    `make stress` runs it with 30 random kills."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.robustness.fault_injection", "--kills", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    report = json.loads(result.stdout)
    assert report["swap_window_hit"] >= 1 and report["kills"] >= 3
    assert report["started_over"] == 0 and report["lost_progress"] == 0
    assert report["history_epochs"] == list(range(1, 13))
    assert report["identical_to_uninterrupted"] and report["ok"] and result.returncode == 0


def test_training_data_with_the_awkward_corpus_trains_and_says_what_it_skipped(tiny_dataset, tmp_path):
    write_awkward(tiny_dataset / "PNEUMONIA" / "odd")
    logged: list[str] = []
    train(Config(epochs=1, **TINY), tiny_dataset, tmp_path / "run", log=logged.append)
    bad = sum(Path(name).suffix != ".gif" for name in AWKWARD_BAD)
    assert any(f"skipped {bad} unreadable file(s)" in line for line in logged)
    summary = metadata_io.read(tmp_path / "run")["data"]
    assert summary["unreadable_skipped"] == bad
    assert sum(sum(split["counts"].values()) for split in summary["splits"].values()) == 48 + len(
        AWKWARD_VALID
    )


def test_mixup_blends_each_image_with_its_partner_by_the_larger_share():
    import tensorflow as tf

    from pneumoscan.loop import Mixup, _Step

    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile(optimizer="adam")
    step = _Step(model, None, 0.0, Mixup(alpha=0.4, seed=7))
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (6, 4, 4, 1)), tf.float32)
    mixed, blend = (np.array(t) for t in step._mix(images))
    again, same = (np.array(t) for t in step._mix(images))
    assert np.array_equal(mixed, again) and np.array_equal(blend, same)  # drawn from (seed, step)
    assert np.all((blend >= 0.5) & (blend <= 1.0)) and np.any(blend < 0.99)
    expected = blend[:, None, None, None] * images + (1 - blend[:, None, None, None]) * images[::-1]
    np.testing.assert_allclose(mixed, expected, rtol=1e-5)
    model.optimizer.iterations.assign(1)
    assert not np.array_equal(np.array(step._mix(images)[1]), blend)  # the next step draws anew


def test_fit_arrays_trains_arrays_with_the_schedule_and_early_stopping_of_a_run():
    """The entry point benchmarks reuse (benchmarks/robustness/label_noise.py): a run's callbacks on a fresh
    state, without a run folder."""
    from pneumoscan.training.batches import Arrays
    from pneumoscan.training.fit import fit_arrays, new_model
    from pneumoscan.training.progress import epoch_callbacks, new_state
    from pneumoscan.training.schedule import learning_rate_at
    from pneumoscan.training.strategy import make_engine

    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 8)
    images = (rng.uniform(0, 60, (16, 64, 64, 1)) + 120 * labels[:, None, None, None]).astype(np.float32)
    config = Config(**{**TINY, "epochs": 6, "early_stopping_patience": 2, "schedule": "cosine"}).resolved()
    engine = make_engine("default")
    keras.utils.set_random_seed(1)
    model = new_model(config, engine)
    before = [w.copy() for w in model.get_weights()]
    state = new_state(config, engine.replicas)
    arrays = Arrays(images, labels)
    fit_arrays(model, engine, arrays, arrays, config, epoch_callbacks(config, engine.replicas, state))
    rows = state["history"]
    assert [row["learning_rate"] for row in rows] == [learning_rate_at(config, e) for e in range(len(rows))]
    # Separable films: val AUC reaches 1 at once and cannot improve, so patience 2 ends it early.
    assert state["stopped_early"] and len(rows) == state["best_epoch"] + 2 < config.epochs
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
