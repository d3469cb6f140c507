"""One worker against two local workers (`train --strategy multi-worker`) on the same data.

    .venv/bin/python -m benchmarks.scale.multi_worker_bench --data ../shared/data/chest_xray [--epochs 3]

Trains pneumonet (its recipe, `--batch-size` per replica) for `--epochs` epochs, first with the
default strategy, then as two workers on 127.0.0.1 under TF_CONFIG, each a process of its own
on this one host; reports the epoch time (median of the epochs after the first, from each run's
history.csv) and training images/s. Then the communication cost: the time of one all-reduce of
a vector the size of pneumonet's gradients between the two workers (median of 50), which is
what a step adds to the computation. On one 2-core machine the two workers compete for the same
cores, so the figure shows the overhead of the engine, not a speed-up: a speed-up needs workers
on machines of their own.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from pneumoscan.strategy import local_tf_configs

REPO = Path(__file__).resolve().parents[2]
ALL_REDUCE = """
import json, os, sys, time
import numpy as np, tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
size = int(sys.argv[1])
values = tf.constant(np.ones(size, np.float32))
@tf.function
def once():
    return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", values))
once()
times = []
for _ in range(50):
    start = time.perf_counter(); once(); times.append(time.perf_counter() - start)
print(json.dumps({"median_ms": 1000 * sorted(times)[len(times) // 2]}))
"""


def run_workers(command: list[str], workers: int) -> list[str]:
    """`command` on `workers` local workers (or alone, with 1); their stdout."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO / "src"))
    if workers == 1:
        return [subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout]
    processes = [
        subprocess.Popen(
            command,
            env={**env, "TF_CONFIG": tf_config},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for tf_config in local_tf_configs(workers)
    ]
    outputs = [process.communicate()[0] for process in processes]
    if any(process.returncode for process in processes):
        raise SystemExit("a worker failed:\n" + outputs[0][-2000:])
    return outputs


def epoch_seconds(run_dir: Path) -> list[float]:
    with open(run_dir / "history.csv") as handle:
        return [float(row["seconds"]) for row in csv.DictReader(handle)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            run_dir = Path(tmp) / f"workers{workers}"
            strategy = "default" if workers == 1 else "multi-worker"
            command = [
                sys.executable, "-m", "pneumoscan", "train", "--data", str(args.data), "--out", str(run_dir),
                "--epochs", str(args.epochs), "--strategy", strategy,
            ]  # fmt: skip
            run_workers(command, workers)
            seconds = epoch_seconds(run_dir)
            meta = json.loads((run_dir / "metadata.json").read_text())
            n_train = sum(meta["data"]["splits"]["train"]["counts"].values())
            epoch = statistics.median(seconds[1:] or seconds)
            rows.append((workers, meta["training"]["global_batch_size"], seconds, epoch, n_train / epoch))
        from pneumoscan.config import Config
        from pneumoscan.model import build_model

        parameters = build_model(Config()).count_params()
        script = Path(tmp) / "all_reduce.py"
        script.write_text(ALL_REDUCE)
        outputs = run_workers([sys.executable, str(script), str(parameters)], 2)
    reduce_ms = json.loads(outputs[0].strip().splitlines()[-1])["median_ms"]
    print(f"pneumonet, {args.epochs} epochs on {args.data}, {os.cpu_count()} cores, one host\n")
    print(
        "| workers | global batch | epoch times (s) | epoch (s, median after the first) | training images/s |"
    )
    print("|---|---|---|---|---|")
    for workers, batch, seconds, epoch, rate in rows:
        times = " / ".join(f"{s:.1f}" for s in seconds)
        print(f"| {workers} | {batch} | {times} | {epoch:.1f} | {rate:.0f} |")
    print(
        f"\nOne all-reduce of {parameters:,} float32 values (pneumonet's gradients) between the two "
        f"workers: {reduce_ms:.2f} ms (median of 50); a step makes one."
    )


if __name__ == "__main__":
    main()
