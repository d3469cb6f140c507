"""The recipe search behind pneumonet's defaults, on data carved from train only.

    .venv/bin/python -m benchmarks.robustness.recipe_search --data ../shared/data/chest_xray \
        --shifted runs/shifted --out runs/search [--only NAME ...]

Each variant trains from scratch (`pneumoscan.train.train`) and is judged on the validation
split and its frozen acquisition-shifted copy (`benchmarks.robustness.make_acquisition_shift`):
ROC AUC and balanced accuracy at the threshold chosen on val. The internal-test split is never looked at here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from pneumoscan.config import RECIPES, AugmentConfig, Config

# The variants as they were searched (BENCHMARKS.md). The first three ran with the first
# pneumonet (64-128-192 filters); 48-96-160 filters ran strong-aug-160 again and strong-aug-128,
# and 160 px stayed. Sizes are explicit so the rows stay what they were.
LIGHT = AugmentConfig()
STRONG = RECIPES["pneumonet"].augment  # the winner, now pneumonet's recipe
VARIANTS: dict[str, Config] = {
    "base-160": Config(arch="pneumonet", image_size=160, augment=LIGHT),
    "strong-aug-160": Config(arch="pneumonet", image_size=160, augment=STRONG),
    "base-192": Config(arch="pneumonet", image_size=192, augment=LIGHT),
    "no-smoothing-160": Config(arch="pneumonet", image_size=160, label_smoothing=0.0, augment=LIGHT),
    "strong-aug-128": Config(arch="pneumonet", image_size=128, augment=STRONG),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--shifted", type=Path, required=True, help="holds val/ (make_acquisition_shift)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(VARIANTS))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from pneumoscan.bundle import Bundle
    from pneumoscan.evaluate import evaluate
    from pneumoscan.train import train

    rows = []
    for name in args.only or VARIANTS:
        result = train(VARIANTS[name], args.data, args.out / name, log=lambda _: None)
        loaded = Bundle.load(args.out / name)
        minutes = loaded.metadata["training"]["seconds"] / 60
        val = evaluate(loaded, args.data, "val", n_resamples=200).result
        shifted = evaluate(loaded, args.shifted / "val", n_resamples=200).result
        rows.append((name, result.best_epoch, minutes, val, shifted))
        changed = {
            k: v
            for k, v in dataclasses.asdict(VARIANTS[name]).items()
            if v != dataclasses.asdict(Config())[k]
        }
        print(f"{name}: {changed or 'defaults'}", flush=True)
    print(
        "\n| variant | best epoch | training minutes | val AUC | val bal. acc. "
        "| shifted val AUC | shifted val bal. acc. |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, epoch, minutes, val, shifted in rows:
        print(
            f"| {name} | {epoch} | {minutes:.1f} | {val['roc_auc']:.4f} | {val['balanced_accuracy']:.4f} | "
            f"{shifted['roc_auc']:.4f} | {shifted['balanced_accuracy']:.4f} |"
        )


if __name__ == "__main__":
    main()
