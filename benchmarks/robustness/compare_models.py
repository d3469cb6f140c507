"""Side by side, the paper's CNN (`seed`) and the default model (`pneumonet`): size, speed, quality.

    .venv/bin/python -m benchmarks.robustness.compare_models --data ../shared/data/chest_xray \
        --runs runs/seed runs/pneumonet --shifted runs/shifted [--timing-epochs 3]

Speed, in one run on this machine: each architecture trains `--timing-epochs` epochs on the
same train split (a fresh process each, under /usr/bin/time for peak RSS); the median of the
epochs after the first gives the epoch time and training images/s (the first also decodes and
caches), and their ratio the speed-up over the paper's CNN. Inference images/s is the
forward pass on cached batches of 32. FLOPs are 2 x multiply-adds per image; the share of
peak compares achieved FLOP/s (training counted as 3x forward) with a float32 matmul on this
CPU. Quality: `pneumoscan.evaluate` of each finished run on val, internal-test and their
frozen shifted copies (benchmarks/robustness/make_acquisition_shift.py), with 95% patient-bootstrap intervals.
Prints Markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS = (
    "roc_auc",
    "balanced_accuracy",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "pr_auc",
)


def matmul_peak() -> float:
    """Float32 FLOP/s of a large matmul: the practical peak of this CPU for TensorFlow."""
    import tensorflow as tf

    a = tf.random.normal((2048, 2048))
    tf.matmul(a, a).numpy()
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        tf.matmul(a, a).numpy()
    return repeats * 2 * 2048**3 / (time.perf_counter() - start)


def timed_training(arch: str, data: Path, epochs: int, workdir: Path) -> dict:
    run_dir = workdir / arch
    command = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "pneumoscan",
        "train",
        "--data",
        str(data),
        "--out",
        str(run_dir),
        "--arch",
        arch,
        "--epochs",
        str(epochs),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    with open(run_dir / "history.csv") as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
    n_train = len(json.loads((run_dir / "splits.json").read_text())["splits"]["train"])
    return {"epoch_seconds": seconds, "n_train": n_train, "peak_rss_mb": rss_kb / 1024}


def inference_speed(bundle, batches: int = 8) -> float:
    """Images/s of `Bundle.forward` on batches of 32 random inputs (after one warm-up batch)."""
    size = bundle.image_size
    x = np.random.default_rng(0).uniform(0, 255, (32, size, size, 1)).astype(np.float32)
    bundle.forward(x)
    start = time.perf_counter()
    for _ in range(batches):
        bundle.forward(x)
    return batches * 32 / (time.perf_counter() - start)


def quality(run: Path, data: Path, shifted: Path | None) -> dict[str, dict]:
    from pneumoscan.bundle import Bundle
    from pneumoscan.evaluate import evaluate

    loaded = Bundle.load(run)
    sets = {"val": (data, "val"), "internal-test": (data, "internal-test")}
    if shifted is not None:
        sets |= {
            "shifted val": (shifted / "val", "val"),
            "shifted internal-test": (shifted / "internal-test", "internal-test"),
        }
    return {name: evaluate(loaded, folder, split).result for name, (folder, split) in sets.items()}


def paired_differences(
    runs: list[Path], folder: Path, split: str, n_resamples: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """New minus seed, for ROC AUC and balanced accuracy (each at its own threshold), with a
    95% interval from one bootstrap over patients shared by both models (paired)."""
    from pneumoscan.bundle import Bundle
    from pneumoscan.evaluate import evaluate
    from pneumoscan.metrics import balanced_accuracy, roc_auc

    evaluations = [evaluate(Bundle.load(run), folder, split, n_resamples=10) for run in runs]
    labels = evaluations[0].labels
    patients = np.array([s.patient for s in evaluations[0].samples])
    assert all(np.array_equal(e.labels, labels) for e in evaluations)
    probs = [e.probabilities for e in evaluations]
    cuts = [e.result["threshold"] for e in evaluations]

    def deltas(index: np.ndarray) -> tuple[float, float]:
        y = labels[index]
        auc = roc_auc(y, probs[1][index]) - roc_auc(y, probs[0][index])
        bacc = balanced_accuracy(y, (probs[1][index] >= cuts[1]).astype(int)) - balanced_accuracy(
            y, (probs[0][index] >= cuts[0]).astype(int)
        )
        return auc, bacc

    unique = np.unique(patients)
    members = {p: np.nonzero(patients == p)[0] for p in unique}
    rng = np.random.default_rng(seed)
    draws = np.array(
        [
            deltas(np.concatenate([members[p] for p in rng.choice(unique, unique.size)]))
            for _ in range(n_resamples)
        ]
    )
    point = deltas(np.arange(labels.size))
    return {
        name: (point[i], *np.nanpercentile(draws[:, i], [2.5, 97.5]))
        for i, name in enumerate(("roc_auc", "balanced_accuracy"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--runs", type=Path, nargs=2, required=True, metavar=("SEED_RUN", "NEW_RUN"))
    parser.add_argument("--shifted", type=Path, default=None, help="folder with val/ and internal-test/")
    parser.add_argument("--timing-epochs", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true", help="quality tables only")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not args.skip_speed:
        speed(args)
    quality_tables(args)


def speed(args: argparse.Namespace) -> None:
    from pneumoscan.bundle import Bundle
    from pneumoscan.model import count_flops

    peak = matmul_peak()
    print(f"CPU: {os.cpu_count()} cores; float32 matmul peak {peak / 1e9:.0f} GFLOP/s\n")
    speed_rows, epoch_medians = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            bundle = Bundle.load(run)
            meta, model = bundle.metadata, bundle.model
            timing = timed_training(meta["arch"], args.data, args.timing_epochs, Path(tmp))
            flops = count_flops(model)
            training = meta["training"]
            epoch = float(np.median(timing["epoch_seconds"][1:] or timing["epoch_seconds"]))
            epoch_medians[meta["arch"]] = epoch
            train_ips = timing["n_train"] / epoch
            infer_ips = inference_speed(bundle)
            speed_rows[meta["arch"]] = {
                "input": f"{meta['input']['height']}x{meta['input']['width']}x1",
                "parameters": f"{model.count_params():,}",
                "GFLOPs / image": f"{flops / 1e9:.3f}",
                "epoch times (s)": " / ".join(f"{s:.1f}" for s in timing["epoch_seconds"]),
                "epoch time (s, median after the first)": f"{epoch:.1f}",
                "training images/s": f"{train_ips:.0f}",
                "inference images/s (forward, batch 32)": f"{infer_ips:.0f}",
                "full training run (s, epochs)": (
                    f"{training['seconds']:.0f} ({training['epochs_run']}, best {training['best_epoch']})"
                ),
                "peak RSS while training (MB)": f"{timing['peak_rss_mb']:.0f}",
                "share of peak, training / inference": (
                    f"{3 * flops * train_ips / peak:.1%} / {flops * infer_ips / peak:.1%}"
                ),
            }
    baseline = epoch_medians.get("seed", next(iter(epoch_medians.values())))
    for arch, row in speed_rows.items():
        row["epoch speed-up over seed"] = f"{baseline / epoch_medians[arch]:.2f}x"
    _table("Size and speed", speed_rows)


def quality_tables(args: argparse.Namespace) -> None:
    for run in args.runs:
        meta = json.loads((run / "metadata.json").read_text())
        results = quality(run, args.data, args.shifted)
        threshold = meta["threshold"]
        print(f"\n### {meta['arch']} ({run}), threshold {threshold['value']:.4f} ({threshold['rule']})\n")
        print("| metric | " + " | ".join(results) + " |")
        print("|---|" + "---|" * len(results))
        for name in ROWS:
            cells = [
                f"{r[name]:.3f} [{r['ci95'][name][0]:.3f}, {r['ci95'][name][1]:.3f}]"
                if r[name] is not None
                else "n/a"
                for r in results.values()
            ]
            print(f"| {name} | " + " | ".join(cells) + " |")
        print("| n | " + " | ".join(str(r["n"]) for r in results.values()) + " |")
    if args.shifted is None:
        return
    print("\n### Paired differences, pneumonet minus seed (bootstrap over patients, 1,000 resamples)\n")
    print("| set | Δ ROC AUC [95% CI] | Δ balanced accuracy [95% CI] |\n|---|---|---|")
    sets = {
        "val": (args.data, "val"),
        "shifted val": (args.shifted / "val", "val"),
        "internal-test": (args.data, "internal-test"),
        "shifted internal-test": (args.shifted / "internal-test", "internal-test"),
    }
    for name, (folder, split) in sets.items():
        d = paired_differences(list(args.runs), folder, split)
        print(
            f"| {name} | "
            + " | ".join(
                f"{d[k][0]:+.4f} [{d[k][1]:+.4f}, {d[k][2]:+.4f}]" for k in ("roc_auc", "balanced_accuracy")
            )
            + " |"
        )


def _table(title: str, rows: dict[str, dict]) -> None:
    names = list(rows)
    print(f"### {title}\n\n| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for key in next(iter(rows.values())):
        print(f"| {key} | " + " | ".join(rows[n][key] for n in names) + " |")


if __name__ == "__main__":
    main()
