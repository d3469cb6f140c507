"""Suspect training labels by confident learning over cross-validated predictions.

    .venv/bin/python -m benchmarks.robustness.label_noise --data ../shared/data/chest_xray \
        --out label_noise.json

Every training film gets an out-of-fold probability of PNEUMONIA: the films are split into
`--folds` patient-grouped folds (`data.group_ids`: a patient's films, and identical files, stay
together), and a pneumonet of the default recipe (at `--image-size`, for `--epochs`, every
epoch kept) trained on the other folds scores each fold. Confident learning (Northcutt, Jiang
and Chuang, 2021; the confident joint as cleanlab counts it) then calls a film's label suspect
when the model is confident in the other class: with per-class thresholds t_k = the mean
predicted probability of class k over the films labelled k, a film labelled i is counted under
class j when its probability of j reaches t_j (the larger margin above threshold when both do);
it is suspect when that j is not i. A looser count is given beside it: films on the wrong side
of 0.5. The output lists every suspect film (relative path, label, out-of-fold probability),
counts by class and file-name family, and every film's out-of-fold probability; `pneumoscan
train --exclude-files` reads the list's `suspects` to leave those films out of training.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

FAMILIES = (("NORMAL2-IM", r"^NORMAL/NORMAL2-IM-"), ("IM", r"^NORMAL/IM-"), ("bacteria", r"_bacteria_"))


def family(relpath: str) -> str:
    for name, pattern in FAMILIES:
        if re.search(pattern, relpath):
            return name
    return "virus" if "_virus_" in relpath else "other"


def folds_of(groups: list[int], folds: int, seed: int) -> np.ndarray:
    """Fold index per film: groups shuffled, then dealt round-robin by size (largest first)."""
    rng = np.random.default_rng(seed)
    unique, sizes = np.unique(groups, return_counts=True)
    order = rng.permutation(len(unique))
    order = order[np.argsort(-sizes[order], kind="stable")]
    loads, fold_of_group = np.zeros(folds), {}
    for index in order:
        fold = int(np.argmin(loads))
        fold_of_group[int(unique[index])] = fold
        loads[fold] += sizes[index]
    return np.array([fold_of_group[g] for g in groups])


def out_of_fold(samples, folds: np.ndarray, image_size: int, epochs: int, seed: int, log) -> np.ndarray:
    import dataclasses

    import keras

    from pneumoscan.bundle import Bundle
    from pneumoscan.config import DEFAULTS
    from pneumoscan.data import inputs
    from pneumoscan.training.batches import Arrays
    from pneumoscan.training.fit import fit_arrays, new_model
    from pneumoscan.training.strategy import make_engine

    # Every epoch kept: patience as long as the run never stops early.
    config = dataclasses.replace(
        DEFAULTS, image_size=image_size, epochs=epochs, random_seed=seed, early_stopping_patience=epochs
    ).resolved()
    engine = make_engine("default")
    images, labels = inputs(samples), np.array([s.label for s in samples])
    probabilities = np.full(len(samples), np.nan)
    for fold in range(int(folds.max()) + 1):
        start = time.perf_counter()
        keras.utils.set_random_seed(seed + fold)
        fit_on, held = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        model = new_model(config, engine)
        fit_arrays(
            model,
            engine,
            Arrays(images[fit_on], labels[fit_on]),
            Arrays(images[held], labels[held]),
            config,
            seed=seed + fold,
        )
        probabilities[held] = Bundle(Path("."), model, {}).forward(images[held])
        log(f"fold {fold + 1}: {len(held)} films scored in {time.perf_counter() - start:.0f} s")
    return probabilities


def confident_joint_suspects(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Indices of films whose label the confident joint puts off the diagonal."""
    p = np.stack([1.0 - probabilities, probabilities], axis=1)
    thresholds = np.array([p[labels == k, k].mean() for k in (0, 1)])
    margin = p - thresholds
    confident = margin >= 0
    counted = np.where(confident.any(axis=1), np.argmax(np.where(confident, margin, -np.inf), axis=1), -1)
    return np.flatnonzero((counted >= 0) & (counted != labels))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train/{NORMAL,PNEUMONIA}")
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)

    from pneumoscan.config import CLASS_NAMES
    from pneumoscan.data import find_layout, group_ids, scan
    from pneumoscan.metrics import summarize

    start = time.perf_counter()
    samples = scan(find_layout(args.data)["train"], args.image_size).samples
    labels = np.array([s.label for s in samples])
    folds = folds_of(group_ids(samples), args.folds, args.seed)
    probabilities = out_of_fold(samples, folds, args.image_size, args.epochs, args.seed, print)
    suspects = confident_joint_suspects(labels, probabilities)
    quality = summarize(labels, probabilities, 0.5)
    wrong_side = np.flatnonzero((probabilities >= 0.5) != (labels == 1))
    counts = Counter((CLASS_NAMES[labels[i]], family(samples[i].relpath)) for i in suspects)
    loose = Counter((CLASS_NAMES[labels[i]], family(samples[i].relpath)) for i in wrong_side)
    totals = Counter((CLASS_NAMES[s.label], family(s.relpath)) for s in samples)
    by_family = {
        f"{label}/{name}": {
            "suspect": counts[(label, name)],
            "wrong_side_of_half": loose[(label, name)],
            "films": total,
        }
        for (label, name), total in sorted(totals.items())
    }
    result = {
        "method": "confident joint over out-of-fold probabilities",
        "folds": args.folds,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "seed": args.seed,
        "films": len(samples),
        "out_of_fold_auc": float(quality["roc_auc"]),
        "suspect_count": len(suspects),
        "wrong_side_of_half_count": len(wrong_side),
        "by_family": by_family,
        "suspects": [
            {
                "file": samples[i].relpath,
                "label": CLASS_NAMES[labels[i]],
                "probability_pneumonia": round(float(probabilities[i]), 4),
            }
            for i in sorted(suspects, key=lambda i: -abs(probabilities[i] - labels[i]))
        ],
        "out_of_fold": [
            {"file": sample.relpath, "fold": int(fold), "probability_pneumonia": round(float(p), 4)}
            for sample, fold, p in zip(samples, folds, probabilities, strict=True)
        ],
        "seconds": round(time.perf_counter() - start),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    auc = result["out_of_fold_auc"]
    print(
        f"out-of-fold AUC {auc:.4f}; {len(suspects)} of {len(samples)} labels suspect "
        f"({len(wrong_side)} on the wrong side of 0.5)"
    )
    for key, value in by_family.items():
        suspect, loose, films = value["suspect"], value["wrong_side_of_half"], value["films"]
        print(f"  {key}: {suspect} suspect, {loose} on the wrong side of 0.5, of {films}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
