"""Kill `pneumoscan train` with SIGKILL again and again, restart the same command each time, and
check that every restart continues and that the finished run equals an uninterrupted one.

    .venv/bin/python -m benchmarks.robustness.fault_injection [--kills 30] [--seed 0] [--json]

The run trains the paper's CNN at 96 px for 12 epochs on the 16 sample X-rays, without early
stopping (several seconds of training, so that kills land everywhere: start-up, mid-epoch,
inside the checkpoint save). Kills
come at a random moment after the process prints its first `Epoch` line; besides them, three
targeted kills land inside the checkpoint swap: right after the atomic exchange of the two
folders, and, with the exchange disabled (systems without renameat2), between the fallback's two
renames, the window where no `checkpoint/` exists. Checked after every restart: it resumed
(never started over once a checkpoint existed) from an epoch no earlier than the last one
seen. Checked at the end: `history.csv` holds epochs 1..8 once each, and `model.keras` equals
an uninterrupted run's bit for bit. `tests/test_train.py` runs this with a few kills; `make
stress` with many.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "chest_xray"
EPOCHS = 12
# Child processes train (as `pneumoscan train` does), optionally with a kill planted inside the
# checkpoint swap.
CHILD = """
import os, signal, sys
from pathlib import Path
import pneumoscan.atomic as atomic
from pneumoscan.config import Config
from pneumoscan.train import train
mode, target_epoch, data, run_dir, epochs = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
saves = {"n": 0}
real_exchange, real_replace = atomic._exchange, os.replace
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def exchange(first, second):
    if mode == "fallback":
        return False
    done = real_exchange(first, second)
    if "checkpoint" in str(second):
        saves["n"] += 1
        if mode == "after-exchange" and saves["n"] == target_epoch:
            die()
    return done
def replace(src, dst):
    if mode == "fallback" and str(src).endswith(".checkpoint.new"):
        saves["n"] += 1
        if saves["n"] == target_epoch:
            die()  # the old checkpoint moved aside, the new one not yet in place
    return real_replace(src, dst)
atomic._exchange, os.replace = exchange, replace
config = Config(arch="seed", image_size=96, epochs=int(epochs), batch_size=2, random_seed=5,
                early_stopping_patience=1000)
train(config, Path(data), Path(run_dir))
"""
RESUMED = re.compile(r"Resuming .* after epoch (\d+)")


def train_command(run_dir: Path, mode: str = "none", target_epoch: int = 0) -> list[str]:
    return [sys.executable, "-c", CHILD, mode, str(target_epoch), str(SAMPLES), str(run_dir), str(EPOCHS)]


def run_once(command: list[str], kill_after: float | None) -> tuple[int, str]:
    """Run `command`; with `kill_after`, SIGKILL it that many seconds after its first `Epoch`
    line. Returns (exit status, stdout)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Epoch "):
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if kill_after is not None and started.wait(timeout=120) and process.poll() is None:
        time.sleep(kill_after)
        process.kill()
    process.wait(timeout=600)
    reader.join(timeout=10)
    return process.returncode, "".join(lines)


def epochs_saved(run_dir: Path) -> int:
    for folder in (run_dir / "checkpoint", run_dir / ".checkpoint.new", run_dir / ".checkpoint.old"):
        state = folder / "state.json"
        if state.is_file():
            try:
                return json.loads(state.read_text())["epochs_done"]
            except (ValueError, KeyError):
                continue
    return 0


def weights(run_dir: Path) -> list:
    import keras

    return keras.models.load_model(run_dir / "model.keras", compile=False).get_weights()


def inject(kills: int, seed: int, workdir: Path) -> dict:
    rng = random.Random(seed)
    reference = workdir / "uninterrupted"
    status, _ = run_once(train_command(reference), None)
    if status != 0:
        raise SystemExit("the uninterrupted run failed")
    run_dir = workdir / "interrupted"
    # First the planted kills, each at the second checkpoint save of its process, then random ones.
    plan = [("after-exchange", 2), ("fallback", 2), ("fallback", 2)] + [("random", 0)] * kills
    report = {
        "runs": 0,
        "kills": 0,
        "resumed_from": [],
        "started_over": 0,
        "lost_progress": 0,
        "swap_window_hit": 0,
    }
    seen = 0
    for mode, epoch in plan:
        if (run_dir / "metadata.json").exists():
            break
        planted = mode != "random"
        status, out = run_once(
            train_command(run_dir, mode if planted else "none", epoch),
            None if planted else rng.uniform(0, 4.0),
        )
        report["runs"] += 1
        report["kills"] += status == -9
        saved = epochs_saved(run_dir)
        report.setdefault("saved_at_kill", []).append(saved if status == -9 else None)
        # Killed between the fallback's two renames: no checkpoint/, the old one moved aside.
        report["swap_window_hit"] += (
            not (run_dir / "checkpoint").exists() and (run_dir / ".checkpoint.old").exists()
        )
        resumed = RESUMED.search(out)
        if resumed:
            report["resumed_from"].append(int(resumed.group(1)))
            report["lost_progress"] += int(resumed.group(1)) < seen
        elif seen and "Epoch 1/" in out:
            report["started_over"] += 1
        seen = max(seen, saved if status == -9 else seen)
    status, out = run_once(train_command(run_dir), None)
    report["runs"] += 1
    history = (run_dir / "history.csv").read_text().splitlines()[1:]
    report.update(
        final_status=status,
        history_epochs=[int(row.split(",")[0]) for row in history],
        identical_to_uninterrupted=all(
            (a == b).all() for a, b in zip(weights(reference), weights(run_dir), strict=True)
        ),
    )
    report["ok"] = (
        status == 0
        and report["swap_window_hit"] >= 1
        and report["started_over"] == 0
        and report["lost_progress"] == 0
        and report["history_epochs"] == list(range(1, EPOCHS + 1))
        and report["identical_to_uninterrupted"]
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30, help="random kills (besides 3 inside the swap)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # this process loads the two models
    workdir = Path(tempfile.mkdtemp(prefix="pneumoscan-faults-"))
    start = time.perf_counter()
    try:
        report = inject(args.kills, args.seed, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps(report))
    else:
        print("| measure | value |\n|---|---|")
        for key, value in report.items():
            print(f"| {key} | {value} |")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
