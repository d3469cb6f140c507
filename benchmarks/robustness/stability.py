"""How far predictions move under small shifts, crops and corner markers, on a whole split.

    .venv/bin/python -m benchmarks.robustness.stability --data ../shared/data/chest_xray --models M1 M2 ... \
        [--split val]

For every image of the split (rebuilt from each model's recorded rule), the copies of
`pneumoscan.robustness` are predicted like the image itself: 13 framing copies (8 shifts of 4%
with black fill, 5 crops of 5-10% resized back) and 13 marker copies ("R"/"L" pasted into a
corner, corners blacked out). Per model: the largest |change of calibrated probability| per
image over the framing copies (median, mean, 90th percentile) and over the marker copies
(mean, 90th percentile), the share of framing copies whose label (at the model's own
threshold) differs from the image's, and the share of images with at least one such copy.
`tests/test_shipped_model.py` bounds the same measures on the bundled samples.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def measure(model: Path, data: Path, split: str) -> dict:
    from pneumoscan.bundle import Bundle
    from pneumoscan.data import inputs, rebuild_splits
    from pneumoscan.robustness import copy_effects

    bundle = Bundle.load(model)
    meta = bundle.metadata
    samples = rebuild_splits(data, meta["data"]["rule"], image_size=bundle.image_size).splits[split]
    effects = copy_effects(bundle, inputs(samples))
    changed = effects.changed_label("framing", bundle.threshold)
    largest, markers = effects.largest_change("framing"), effects.largest_change("markers")
    return {
        "model": str(model),
        "arch": meta["arch"],
        "threshold": bundle.threshold,
        "n": len(samples),
        "median": float(np.median(largest)),
        "mean": float(largest.mean()),
        "p90": float(np.quantile(largest, 0.9)),
        "marker_mean": float(markers.mean()),
        "marker_p90": float(np.quantile(markers, 0.9)),
        "copies_flipped": float(changed.mean()),
        "images_flipped": float(changed.any(axis=1).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--models", type=Path, nargs="+", required=True)
    parser.add_argument("--split", default="val", choices=("train", "val", "internal-test"))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    print(
        f"{args.split} split of {args.data}: largest |change of calibrated probability| per image over "
        "13 shifted/cropped copies and over 13 marked copies, and framing copies whose label changes "
        "at the model's threshold\n"
    )
    print(
        "| model | arch | threshold | n | framing median | framing mean | framing 90th pct | markers mean "
        "| markers 90th pct | copies with a changed label | images with a changed label |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        r = measure(model, args.data, args.split)
        print(
            f"| {r['model']} | {r['arch']} | {r['threshold']:.3f} | {r['n']} | {r['median']:.3f} | "
            f"{r['mean']:.3f} | {r['p90']:.3f} | {r['marker_mean']:.3f} | {r['marker_p90']:.3f} | "
            f"{r['copies_flipped']:.1%} | {r['images_flipped']:.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
