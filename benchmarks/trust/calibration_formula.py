"""What writing exp and log out (calibrate.exact_exp, exact_log) changes against NumPy's:
`python -m benchmarks.trust.calibration_formula [--n N] [--seed S]`.

1. On N float32 raw outputs drawn uniformly in (0, 1) and the bundled model's calibration: how
   many calibrated probabilities differ from the former formula (np.log, np.exp, the same
   branchy sigmoid), by how many ulps at most, and how many fall on the other side of the
   threshold or a band edge.
2. On the 16 bundled sample X-rays through `predict`: the same, per film, with their labels,
   borderline and ood flags.

The page computes the written-out formula bit for bit (tests/test_decision_js.py), so the
changes measured here are the only ones between this and the former Python probabilities.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pneumoscan import calibrate
from pneumoscan.bundle import Bundle

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "chest_xray"


def former(raw: np.ndarray, calibration: dict) -> np.ndarray:
    """The calibrated probability as calibrate.py computed it before: np.log and np.exp."""
    q = np.clip(np.asarray(raw, np.float64), calibrate.EPSILON, 1 - calibrate.EPSILON)
    z = calibration["slope"] * np.log(q / (1 - q)) + calibration["intercept"]
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def compare(old: np.ndarray, new: np.ndarray, threshold: float, band: dict) -> str:
    changed = old != new
    ulps = np.abs(old - new) / np.spacing(np.maximum(old, new))
    sides = ((old >= threshold) != (new >= threshold)).sum()
    low, high = band["low"], band["high"]
    edges = (calibrate.in_band(old, low, high) != calibrate.in_band(new, low, high)).sum()
    return (
        f"{changed.sum()} of {old.size} probabilities differ ({changed.mean():.1%}), at most "
        f"{ulps.max():.0f} ulp; {sides} change label, {edges} change borderline"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from pneumoscan.predict import predict_files

    bundle = Bundle.load(None)
    calibration, band, threshold = (
        bundle.metadata["calibration"],
        bundle.metadata["borderline"],
        bundle.threshold,
    )
    raw = np.random.default_rng(args.seed).uniform(0, 1, args.n).astype(np.float32)
    print(
        f"uniform raw outputs: {compare(former(raw, calibration), bundle.calibrated(raw), threshold, band)}"
    )
    paths = sorted(SAMPLES.rglob("*.jpeg"))
    records = predict_files(bundle, paths)
    new = np.array([r["probability"] for r in records])
    # The raw outputs back from the probabilities would round; run the forward pass again.
    from pneumoscan.pipeline import images

    raws = [bundle.forward(x) for _, _, _, x, _ in images(paths, bundle.image_size).batch(32)]
    old = former(np.concatenate(raws), calibration)
    print(
        f"bundled samples: {compare(old, new, threshold, band)}; "
        f"{sum(r['ood'] for r in records)} flagged ood (ood_score does not use the formula)"
    )


if __name__ == "__main__":
    main()
