"""How long `pneumoscan evaluate`'s confidence intervals take: `metrics.bootstrap_ci`.

    .venv/bin/python -m benchmarks.speed.bootstrap_bench

Synthetic evaluations of 600 images (2 per patient, scores correlated within a patient, as in
tests/test_metrics.py) and of 5,000 images, 1,000 patient resamples each; the median of 5
runs after one warm-up, in seconds. The official test split has 624 images.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from pneumoscan import metrics

SIZES = (600, 5000)
RUNS = 5


def clustered(images: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two images per patient sharing the label; scores correlated within a patient."""
    rng = np.random.default_rng(seed)
    patients = images // 2
    label = rng.integers(0, 2, patients)
    score = rng.normal(0.4 + 0.25 * label, 0.15)
    groups = np.repeat(np.arange(patients), 2)
    return label[groups], np.clip(score[groups] + rng.normal(0, 0.05, groups.size), 0, 1), groups


def main() -> int:
    print("| images | patients | resamples | seconds (median of 5) |\n|---|---|---|---|")
    for images in SIZES:
        y, prob, groups = clustered(images)
        metrics.bootstrap_ci(y, prob, 0.5, groups, n_resamples=1000)  # warm-up
        seconds = []
        for _ in range(RUNS):
            start = time.perf_counter()
            metrics.bootstrap_ci(y, prob, 0.5, groups, n_resamples=1000)
            seconds.append(time.perf_counter() - start)
        print(f"| {images:,} | {images // 2:,} | 1,000 | {np.median(seconds):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
