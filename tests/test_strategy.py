"""pneumoscan.strategy and `train --strategy`: two local workers under TF_CONFIG train one run
that the chief alone writes, resume it after a worker is killed, and refuse what cannot run."""

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
import pytest

from conftest import REPO, write_class_folders
from pneumoscan.cli import main
from pneumoscan.strategy import local_tf_configs

pytestmark = pytest.mark.slow
EPOCHS = 3


@pytest.fixture(scope="module")
def three_hundred(tmp_path_factory) -> Path:
    patients = {f"IM-{i:04d}": 0 for i in range(75)} | {f"person{i}": 1 for i in range(75)}
    return write_class_folders(tmp_path_factory.mktemp("mw") / "xray", patients)


def _start_workers(
    data: Path, run_dir: Path, scratch: Path, epochs: int = EPOCHS, options: tuple[str, ...] = ()
) -> list[subprocess.Popen]:
    """The same command on two workers, each with its TF_CONFIG; worker-local files go to `scratch`."""
    command = [
        sys.executable, "-m", "pneumoscan", "train", "--data", str(data), "--out", str(run_dir),
        "--arch", "seed", "--image-size", "64", "--batch-size", "8", "--epochs", str(epochs),
        "--seed", "3", "--strategy", "multi-worker", *options,
    ]  # fmt: skip
    processes = []
    for index, tf_config in enumerate(local_tf_configs(2)):
        env = dict(
            os.environ,
            TF_CONFIG=tf_config,
            PYTHONPATH=str(REPO / "src"),
            TMPDIR=str(scratch),
            PYTHONUNBUFFERED="1",
        )
        with open(scratch / f"worker{index}.log", "a") as log:  # the child keeps its own copy
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def _wait(processes: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
    return codes


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def test_two_workers_train_one_run_that_the_chief_writes(three_hundred, tmp_path):
    """With mixup and the moving average of the weights on: both draw and swap per replica."""
    run_dir, scratch = tmp_path / "run", tmp_path / "scratch"
    scratch.mkdir()
    options = ("--mixup", "0.2", "--weight-average", "0.9")
    assert _wait(_start_workers(three_hundred, run_dir, scratch, options=options)) == [0, 0], (
        scratch / "worker1.log"
    ).read_text()
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["mixup"], config["weight_average_momentum"]) == (0.2, 0.9)
    assert [int(row["epoch"]) for row in _history(run_dir)] == list(range(1, EPOCHS + 1))
    training = json.loads((run_dir / "metadata.json").read_text())["training"]
    assert (training["strategy"], training["replicas"], training["global_batch_size"]) == (
        "multi-worker",
        2,
        16,
    )
    keras.models.load_model(run_dir / "model.keras")
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["model.keras", "metadata.json", "config.json", "history.csv", "splits.json", "logs"]
    )
    assert not [p for p in scratch.iterdir() if p.name.startswith("pneumoscan-worker")]  # removed
    both = [(scratch / f"worker{i}.log").read_text() for i in range(2)]
    assert all(f"Epoch {EPOCHS}/{EPOCHS}" in log for log in both)


def test_a_killed_worker_and_a_restart_continue_the_run(three_hundred, tmp_path):
    run_dir, scratch = tmp_path / "run", tmp_path / "scratch"
    scratch.mkdir()
    epochs = 6
    processes = _start_workers(three_hundred, run_dir, scratch, epochs)
    state = run_dir / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and processes[0].poll() is None:
        if state.is_file() and json.loads(state.read_text())["epochs_done"] >= 2:
            break
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGKILL)  # a worker dies: the chief cannot go on, and says so
    assert _wait(processes, timeout=180) == [1, -signal.SIGKILL]
    said = (scratch / "worker0.log").read_text()
    assert "another worker of the cluster stopped or cannot be reached" in said and "Traceback" not in said
    done = json.loads(state.read_text())["epochs_done"]
    assert 2 <= done < epochs and not (run_dir / "metadata.json").exists()

    assert _wait(_start_workers(three_hundred, run_dir, scratch, epochs)) == [0, 0]
    rows = _history(run_dir)  # every epoch once (early stopping may end it before the last)
    assert [int(row["epoch"]) for row in rows] == list(range(1, len(rows) + 1)) and len(rows) > done
    assert f"Resuming {run_dir} after epoch {done}" in (scratch / "worker0.log").read_text()
    assert "Run folder:" not in (scratch / "worker1.log").read_text()  # the chief's to say
    keras.models.load_model(run_dir / "model.keras")


@pytest.mark.parametrize(
    "env, flags, message",
    [
        (
            {},
            ["--strategy", "multi-worker"],
            "--strategy multi-worker needs the TF_CONFIG environment variable",
        ),
        ({"TF_CONFIG": "{oops"}, ["--strategy", "multi-worker"], "TF_CONFIG is not understood"),
        (
            {
                "TF_CONFIG": json.dumps(
                    {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}
                )
            },
            ["--strategy", "multi-worker"],
            "task must be a worker with 0 <= index < 1",
        ),
        ({}, ["--precision", "mixed_float16"], "--precision mixed_float16 needs a GPU"),
    ],
)
def test_what_cannot_run_here_is_one_sentence_and_exit_2(
    env, flags, message, tiny_dataset, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "mixed_float16" in flags:
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            pytest.skip("this machine has a GPU, where mixed precision runs")
    args = ["train", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"), "--epochs", "1", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
