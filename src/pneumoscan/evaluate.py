"""Judge a model like a clinical test: `pneumoscan evaluate --model MODEL --data DIR [--split S]`,
re-choose its operating threshold: `pneumoscan threshold --model MODEL --data DIR --rule R`, and
refit its out-of-distribution flag and borderline band: `pneumoscan ood --model MODEL --data DIR`
(both through `pneumoscan.decision`).

Metrics come at the model's own (calibrated) threshold with 95% intervals from a bootstrap
over the groups the splits keep whole (a patient's images, joined with byte-identical files),
and again at 0.5 under `at_0_5`. `val`, `internal-test` and `train` are rebuilt exactly as
training carved them, from either layout, and checked against the recorded digests; `test` is
the dataset's own test/ folder, or every image of a `{NORMAL,PNEUMONIA}` folder (an external
test set), whose files byte-identical to one of the model's splits are flagged.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pneumoscan import metadata as metadata_io
from pneumoscan import run_folder
from pneumoscan.bundle import INFERENCE_BATCH, Bundle
from pneumoscan.config import CLASS_NAMES, ThresholdRule
from pneumoscan.data import DataError, Sample, find_layout, group_ids, inputs, rebuild_splits, scan
from pneumoscan.decision import fit_on_splits, with_decision
from pneumoscan.metrics import (
    CI_METRICS,
    bootstrap_ci,
    collapsed,
    interval_counts,
    small_sample_intervals,
    summarize,
    to_json_safe,
)

SPLITS = ("test", "val", "internal-test", "train")


@dataclass
class Evaluation:
    """Everything a report needs: the JSON result plus the per-image arrays."""

    result: dict
    split: str
    model_dir: Path
    metadata: dict
    samples: list[Sample]
    labels: np.ndarray
    probabilities: np.ndarray
    notes: list[str] = field(default_factory=list)


def select_samples(
    meta: dict, data_dir: Path, split: str, image_size: int | None = None, file_lists: dict | None = None
) -> tuple[list[Sample], str, list[str]]:
    """The images to evaluate, a name for them, and notes (unreadable files skipped, ...).

    With `image_size`, each sample carries its model input from the scan's one decode. A split
    of the model's own (val, internal-test, train) is rebuilt from its `file_lists` (the model
    folder's splits.json) when given, else by the rule in its metadata.

    Raises:
        DataError: the folder or the requested split does not exist (exit 2).
    """
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    if split == "test" and any((data_dir / name).is_dir() for name in CLASS_NAMES):
        found = scan(data_dir, image_size)  # an external test set: every image counts
        return found.samples, str(data_dir), _scan_notes(found)
    layout = find_layout(data_dir)
    if split == "test":
        if "test" not in layout:
            raise DataError(
                f"{data_dir / 'test'}: no such folder; pass --split val or internal-test, "
                "or --data a folder holding NORMAL/ and PNEUMONIA/."
            )
        found = scan(layout["test"], image_size)
        return found.samples, "test", _scan_notes(found)
    digests = {name: info["digest"] for name, info in meta["data"]["splits"].items()}
    rebuilt = rebuild_splits(data_dir, meta["data"]["rule"], digests, image_size, file_lists)
    notes = [n for s in rebuilt.scans.values() for n in _scan_notes(s)]
    return rebuilt.splits[split], split, notes


def _scan_notes(found) -> list[str]:
    if not found.unreadable:
        return []
    return [f"skipped {len(found.unreadable)} unreadable file(s): {'; '.join(found.unreadable[:3])}"]


def read_file_lists(model_dir: Path) -> dict | None:
    """The model folder's splits.json, or None when it has none."""
    path = Path(model_dir) / run_folder.SPLITS
    return json.loads(path.read_text()) if path.is_file() else None


def split_members(model_dir: Path, samples: list[Sample]) -> dict[str, list[bool]]:
    """Per split of the model (`splits.json`), which of `samples` have the bytes of one of its
    files; empty when the model folder has no splits.json. Bytes, not patient ids: ids are not
    comparable across datasets."""
    file_lists = read_file_lists(model_dir)
    if file_lists is None:
        return {}
    members = {}
    for name, files in file_lists["splits"].items():
        hashes = {short for _, short in files}
        length = len(next(iter(hashes), ""))
        members[name] = [s.sha256[:length] in hashes for s in samples]
    return members


def split_overlap(model_dir: Path, samples: list[Sample]) -> dict[str, int]:
    """Per split of the model, how many of `samples` are one of its files (`split_members`)."""
    return {name: sum(inside) for name, inside in split_members(model_dir, samples).items()}


def _warnings(metadata: dict, split: str, overlap: dict[str, int], n: int) -> list[str]:
    """What makes these figures optimistic, one sentence each."""
    notes = []
    if overlap.get("train"):
        notes.append(
            f"warning: {overlap['train']} of the {n} evaluated files were in the model's "
            "training split; these figures are optimistic."
        )
    for name in ("val", "internal-test"):
        if split == "test" and overlap.get(name):
            notes.append(
                f"warning: {overlap[name]} of the {n} evaluated files have the bytes of files of the "
                f"model's {name} split; they are scored all the same."
            )
    fitted = [
        what
        for what, on in (
            ("best epoch", "val" if metadata["training"].get("selected_on", "").startswith("val") else None),
            ("calibration", metadata["calibration"].get("fitted_on")),
            ("threshold", metadata["threshold"].get("split")),
        )
        if on == "val"
    ]
    if split == "val" and fitted:
        listed = " and ".join([", ".join(fitted[:-1]), fitted[-1]] if len(fitted) > 1 else fitted)
        notes.append(
            f"warning: the {listed} of this model were chosen on this val split; "
            "these figures are optimistic (internal-test or an external test set is not)."
        )
    return notes


def evaluate(
    model: str | Path | Bundle | None,
    data_dir: Path,
    split: str = "test",
    batch_size: int = INFERENCE_BATCH,
    n_resamples: int = 1000,
) -> Evaluation:
    bundle = Bundle.load(model)
    samples, name, notes = select_samples(
        bundle.metadata, data_dir, split, bundle.image_size, read_file_lists(bundle.folder)
    )
    notes += _warnings(bundle.metadata, split, split_overlap(bundle.folder, samples), len(samples))
    labels, raw = split_outputs(bundle, samples, batch_size)
    probabilities = bundle.calibrated(raw)
    threshold = bundle.threshold
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = summarize(labels, probabilities, threshold)
        bootstrap = bootstrap_ci(
            labels,
            probabilities,
            threshold,
            groups=np.array(group_ids(samples)),
            n_resamples=n_resamples,
        )
        result["ci95"] = small_sample_intervals(bootstrap, result["confusion_matrix"])
        at_half = summarize(labels, probabilities, 0.5)
    notes.extend(sorted({f"warning: {w.message}" for w in caught}))
    result["at_0_5"] = {k: v for k, v in at_half.items() if k != "threshold"}
    return Evaluation(
        to_json_safe(result), name, bundle.folder, bundle.metadata, samples, labels, probabilities, notes
    )


def format_table(evaluation: Evaluation) -> str:
    """The metrics for people: value, 95% interval and the n it rests on, then the confusion
    matrix and what the intervals are."""
    r = evaluation.result
    counts = interval_counts(r["confusion_matrix"])
    lines = [
        f"{evaluation.split}: {r['n']} images, threshold {r['threshold']:.4f}",
        f"{'metric':<18}{'value':>8}   95% CI               {'n':>6}  at 0.5",
    ]
    for name in (*CI_METRICS, "brier", "ece"):
        lo, hi = r["ci95"].get(name, [None, None])
        mark = "*" if collapsed(r["ci95"].get(name)) else " "
        interval = f"[{_num(lo)}, {_num(hi)}]{mark}" if name in r["ci95"] else ""
        n = str(counts[name]) if name in counts else ""
        lines.append(f"{name:<18}{_num(r[name]):>8}   {interval:<20} {n:>6} {_num(r['at_0_5'][name]):>7}")
    cm = r["confusion_matrix"]
    lines.append(f"confusion matrix: TN {cm['tn']}  FP {cm['fp']}  FN {cm['fn']}  TP {cm['tp']}")
    lines.append(INTERVALS)
    if any(collapsed(r["ci95"].get(name)) for name in CI_METRICS):
        lines.append(COLLAPSED)
    return "\n".join(lines)


# What the intervals are, said under the table and in the report.
INTERVALS = (
    "95% CI: a bootstrap over patients, widened for proportions (accuracy, sensitivity, specificity, "
    "precision, npv, and their mean, balanced accuracy) to take in the Wilson interval, which holds at "
    "small counts; n is the number of films each rests on."
)
COLLAPSED = "* a single point: too few films, or all alike, for the bootstrap to say how uncertain it is."


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def split_outputs(
    bundle: Bundle, samples: list[Sample], batch_size: int = INFERENCE_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, raw float32 model outputs) for samples scanned with the model's input size."""
    return np.array([s.label for s in samples]), bundle.forward(inputs(samples), batch_size)


def rechoose_threshold(
    model_dir: Path, data_dir: Path, rule: ThresholdRule, batch_size: int = INFERENCE_BATCH
) -> dict:
    """`pneumoscan threshold`: refit calibration, the threshold and the borderline band around
    it on the rebuilt val split (`decision.fit_on_splits`; the out-of-distribution block stays);
    rewrite metadata.

    Returns:
        The new metadata.
    """
    bundle = Bundle.load(model_dir)
    samples, _, _ = select_samples(
        bundle.metadata, data_dir, "val", bundle.image_size, read_file_lists(bundle.folder)
    )
    decision, metrics = fit_on_splits(bundle, None, samples, batch_size, rule)
    meta = with_decision(bundle.metadata, decision, metrics)
    metadata_io.write(bundle.folder, meta)
    return meta


def refit_trust(model_dir: Path, data_dir: Path, batch_size: int = INFERENCE_BATCH) -> dict:
    """`pneumoscan ood`: rebuild the model's train and val splits from `data_dir` by its recorded
    rule, refit the out-of-distribution block and the borderline band around the current
    calibration and threshold (which stay as they are), and rewrite metadata.json.

    Returns:
        The new metadata.

    Raises:
        DataError: the data is not the data the model was trained on.
    """
    bundle = Bundle.load(model_dir)
    recorded = bundle.metadata["data"]
    digests = {name: info["digest"] for name, info in recorded["splits"].items()}
    splits = rebuild_splits(Path(data_dir), recorded["rule"], digests, bundle.image_size)
    decision, _ = fit_on_splits(bundle, splits.splits["train"], splits.splits["val"], batch_size)
    meta = with_decision(bundle.metadata, decision)
    metadata_io.write(bundle.folder, meta)
    return meta
