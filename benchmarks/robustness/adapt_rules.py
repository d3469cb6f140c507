"""`python -m benchmarks.robustness.adapt_rules --saved FILE.npz --rules R...`: threshold rules of
`pneumoscan adapt` scored again on out-of-fold raw outputs that `adapt_variants --save` kept,
without fine-tuning again: per rule and number of epochs, each fold's decision fitted on the
other folds' films, pooled out of fold, mean ± sd over the saved fold seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.robustness.adapt_variants import NAMES, figures, out_of_fold
from pneumoscan.bundle import Bundle
from pneumoscan.config import ThresholdRule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saved", required=True, type=Path, help="adapt_variants --save's file")
    parser.add_argument("--rules", nargs="+", required=True, help="threshold rules")
    parser.add_argument("--model", default=None, help="the parent (its decision's other blocks)")
    args = parser.parse_args()
    saved = np.load(args.saved)
    labels, parent = saved["labels"], Bundle.load(args.model).decision
    seeds = sorted({key.split("_")[0] for key in saved.files if key.startswith("seed")})
    kinds = sorted({key.split("_", 1)[1] for key in saved.files if key.startswith("seed")} - {"folds"})
    print(f"| epochs | rule | {' | '.join(NAMES)} |")
    print("|---|---|" + "---|" * len(NAMES))
    for kind in [*kinds, "recalibrate"]:
        for text in args.rules:
            rule, values = ThresholdRule.parse(text), []
            for seed in seeds:
                raws = [saved["raw"]] * 5 if kind == "recalibrate" else list(saved[f"{seed}_{kind}"])
                probability, positive = out_of_fold(labels, raws, saved[f"{seed}_folds"], rule, parent)
                values.append(figures(labels, probability, positive))
            table = np.array(values)
            cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(table.mean(0), table.std(0, ddof=1), strict=True)]
            print(f"| {kind} | {text} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
