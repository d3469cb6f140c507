"""Test-time augmentation measured on the acquisition design, paired with no augmentation.

    .venv/bin/python -m benchmarks.robustness.tta_design --data ../shared/data/chest_xray \
        --runs runs/shift/reweight-s7 runs/shift/reweight-s1337

For each run (a run folder of `acquisition_val_design train`), its val and internal-test films
(rebuilt from splits.json) go through the model as they are and moved by 4% of the side
(`robustness.translation_variants`: 8 directions, black fill); each copy set of `COPY_SETS`
averages the raw outputs of the film and the named copies. Calibration and threshold are
refitted on val for every set (the default rule), and internal-test gives ROC AUC,
specificity and accuracy at the held-out split's class mix, with the paired difference from
no augmentation: 95% bootstrap over patients (`acquisition_val_design`'s resamples), per run and as the
mean over runs. Val AUC is printed beside them, the only figure a set could be chosen by.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.robustness import acquisition_val_design as design

# Indices into translation_variants' order (dy, dx):
# (-s,-s), (-s,0), (-s,+s), (0,-s), (0,+s), (+s,-s), (+s,0), (+s,+s).
COPY_SETS = {
    "none": (),
    "shifts8": (0, 1, 2, 3, 4, 5, 6, 7),
    "vertical3": (1, 6),
    "horizontal3": (3, 4),
    "diagonal3": (0, 7),
    "antidiagonal3": (2, 5),
}
SHOWN = ("roc_auc", "specificity", "held_out_accuracy")


def outputs_with_copies(run_dir: Path, data: Path) -> dict[str, dict]:
    """Per copy set, the run's outputs as `design.outputs_of` gives them."""
    from pneumoscan.calibrate import fit_operating_point
    from pneumoscan.config import DEFAULTS
    from pneumoscan.robustness import translation_variants

    plain = design.outputs_of(run_dir, data, copies=translation_variants)
    result = {}
    for name, members in COPY_SETS.items():
        outputs = {**plain}
        for split in ("val", "internal-test"):
            own = plain[split]
            raw = np.c_[own["raw"], own["copies"][:, list(members)]].mean(axis=1)
            outputs[split] = {**own, "raw": raw.astype(np.float32)}
        fitted = fit_operating_point(outputs["val"]["labels"], outputs["val"]["raw"], DEFAULTS.threshold_rule)
        outputs["shipped"] = (fitted["calibration"], fitted["threshold"]["value"])
        result[name] = outputs
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders, NAME-sSEED")
    args = parser.parse_args(argv)

    from pneumoscan.metrics import _group_weights, summarize

    per_run: dict[str, dict] = {}
    lines = [
        "| run | copies | val AUC | " + " | ".join([*SHOWN, *(f"Δ {m}" for m in SHOWN)]) + " |",
        "|---|---|---|" + "---|" * (2 * len(SHOWN)),
    ]
    for run_dir in args.runs:
        seed = int(run_dir.name.rsplit("-s", 1)[1])
        per_run[run_dir.name] = {}
        for name, outputs in outputs_with_copies(run_dir, args.data).items():
            scored = design.scores(outputs)
            weights = _group_weights(scored["groups"], design.N_RESAMPLES, np.random.default_rng(seed))
            probabilities, threshold = scored["points"]["shipped"]
            per_run[run_dir.name][name] = design.resampled(
                scored["labels"], probabilities, threshold, weights
            )
            val_auc = summarize(outputs["val"]["labels"], outputs["val"]["raw"], 0.5)["roc_auc"]
            per_run[run_dir.name][name]["val_auc"] = val_auc
        for name, values in per_run[run_dir.name].items():
            lines.append(_row(run_dir.name, name, [values], [per_run[run_dir.name]["none"]]))
    for name in COPY_SETS:
        mine = [per_run[run][name] for run in per_run]
        lines.append(_row("mean of runs", name, mine, [per_run[run]["none"] for run in per_run]))
    print("\n".join(lines))
    return 0


def _row(run: str, name: str, results: list[dict], plain: list[dict]) -> str:
    alone = design.pooled(results)
    difference = design.pooled(results, plain)
    val_auc = np.mean([r["val_auc"] for r in results])
    cells = [f"{alone[m][0]:.3f} [{alone[m][1]:.3f}, {alone[m][2]:.3f}]" for m in SHOWN]
    cells += [f"{difference[m][0]:+.3f} [{difference[m][1]:+.3f}, {difference[m][2]:+.3f}]" for m in SHOWN]
    return f"| {run} | {name} | {val_auc:.4f} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
