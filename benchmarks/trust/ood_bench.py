"""Benchmark the out-of-distribution flag: how many non-X-rays it flags, and how many X-rays.

    .venv/bin/python -m benchmarks.trust.ood_bench --model src/pneumoscan/bundled \
        [--data ../shared/data/chest_xray] [--real DIR] [--per-kind 60] [--seed 7]

Non-X-rays go through `pneumoscan predict`'s own path (files decoded, one forward pass, the
model's `ood` block): the synthetic kinds of `benchmarks.trust.nonxray` (written as PNGs), the real
images installed packages ship (matplotlib's and scikit-learn's photographs and matplotlib's MRI
slice; pydicom's CT, MR, NM and ultrasound test slices), and every image of `--real` (a folder of
your own; not in CI). X-rays: the model's val and internal-test splits rebuilt from `--data`, the
frozen shifted copies of both (`benchmarks.robustness.acquisition_shift`, acquisition-like changes), and a
file-name family held out from the fit: the statistics refitted without NORMAL2-IM- files
(threshold on val without them too) and the rate measured on the NORMAL2-IM- files, then the
same for IM- files. Prints Markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.robustness.acquisition_shift import build_shifted
from benchmarks.trust import nonxray
from pneumoscan import ood
from pneumoscan.bundle import Bundle
from pneumoscan.data import find_images, inputs, rebuild_splits
from pneumoscan.decision import OodRule
from pneumoscan.predict import expand_paths, iter_predictions

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray"
FAMILIES = ("NORMAL2-IM-", "IM-")


def predict_records(bundle: Bundle, paths: list[Path]) -> list[dict]:
    """predict's records for files, those it could read. A decoder that crashes on a file (rather
    than refusing it in a sentence) must not stop the benchmark: the files then go one by one,
    and the culprit is named on stdout."""
    try:
        records = list(iter_predictions(bundle, expand_paths(paths)))
    except Exception:
        records = []
        for path in paths:
            try:
                records.extend(iter_predictions(bundle, expand_paths([path])))
            except Exception as error:
                print(f"skipped {path}: {type(error).__name__}: {error}", flush=True)
    return [r for r in records if "error" not in r]


def row(name: str, records: list[dict]) -> str:
    """One Markdown row: set, images, flagged, rate, lowest and median score."""
    scores = np.array([r["ood_score"] for r in records])
    flagged = int(sum(r["ood"] for r in records))
    return (
        f"| {name} | {len(records)} | {flagged} | {flagged / max(len(records), 1):.1%} | "
        f"{scores.min():.2f} | {np.median(scores):.2f} |"
    )


def non_xray_paths(folder: Path, per_kind: int, seed: int, real: Path | None) -> dict[str, list[Path]]:
    """set name -> its files, for every non-X-ray set (the synthetic and packaged ones written
    under `folder`)."""
    sets = {
        f"synthetic {kind}": paths
        for kind, paths in nonxray.write_set(folder / "synthetic", per_kind, seed).items()
    }
    packaged = folder / "packaged"
    packaged.mkdir()
    for name, pixels in nonxray.packaged_images().items():
        Image.fromarray(pixels).save(packaged / f"{Path(name).stem}.png")
    sets["packaged photos and MRI (matplotlib, scikit-learn)"] = find_images(packaged)
    sets["pydicom CT, MR, NM, ultrasound slices"] = nonxray.packaged_slices()
    if real is not None and real.is_dir():
        sets[f"{real.name} (a folder of real images)"] = find_images(real)
    return sets


def non_xray_sets(bundle: Bundle, folder: Path, per_kind: int, seed: int, real: Path | None) -> dict:
    """set name -> predict records, for every non-X-ray set."""
    return {
        name: predict_records(bundle, paths)
        for name, paths in non_xray_paths(folder, per_kind, seed, real).items()
    }


def xray_features(bundle: Bundle, data: Path) -> dict:
    """split -> (features, [colourfulness, aspect], file names, labels, calibrated
    probabilities), from the rebuilt splits."""
    meta = bundle.metadata
    digests = {name: info["digest"] for name, info in meta["data"]["splits"].items()}
    splits = rebuild_splits(data, meta["data"]["rule"], digests, bundle.image_size)
    layer, pooling = meta["ood"]["feature_layer"], meta["ood"]["feature_pooling"]
    out = {}
    for name, samples in splits.splits.items():
        raw, output = bundle.forward_features(inputs(samples), 64, layer)
        names, labels = np.array([s.path.name for s in samples]), np.array([s.label for s in samples])
        out[name] = (
            ood.features(output, pooling),
            ood.sample_checks(samples),
            names,
            labels,
            bundle.calibrated(raw),
        )
    return out


def borderline_rows(bundle: Bundle, splits: dict) -> list[str]:
    """What the borderline band holds on val (where it was fitted) and internal-test."""
    rows = []
    for name in ("val", "internal-test"):
        _, _, _, labels, probabilities = splits[name]
        wrong = (probabilities >= bundle.threshold) != (labels == 1)
        inside = np.array([bool(bundle.borderline(p)) for p in probabilities])
        rows.append(
            f"| {name} | {len(labels)} | {inside.sum()} ({inside.mean():.1%}) | {wrong.sum()} | "
            f"{(wrong & inside).sum()} | {(wrong & ~inside).sum()} / {(~inside).sum()} = "
            f"{(wrong & ~inside).sum() / (~inside).sum():.2%} |"
        )
    return rows


def flag_rate(block: dict, features: np.ndarray, checks: np.ndarray) -> tuple[int, int]:
    flags = OodRule.flags(ood.scores(block, features, checks))
    return int(flags.sum()), len(flags)


def held_out_rows(bundle: Bundle, splits: dict) -> list[str]:
    """Rows for each family held out: refit without it, measure on it."""
    rows = []
    source = bundle.metadata["ood"]["feature_layer"], bundle.metadata["ood"]["feature_pooling"]
    for family in FAMILIES:
        member = {name: np.char.startswith(split[2], family) for name, split in splits.items()}
        (train_f, train_c, *_), (val_f, val_c, *_) = splits["train"], splits["val"]
        block = ood.fit(train_f[~member["train"]], val_f[~member["val"]], val_c[~member["val"]], source)
        unseen = [(s[0][member[n]], s[1][member[n]]) for n, s in splits.items() if n != "train"]
        measured = {
            "its val + internal-test images": flag_rate(
                block, np.concatenate([u[0] for u in unseen]), np.concatenate([u[1] for u in unseen])
            ),
            "its images in the CNN's training split": flag_rate(
                block, train_f[member["train"]], train_c[member["train"]]
            ),
        }
        for what, (flagged, n) in measured.items():
            rows.append(f"| {family} held out: {what} | {n} | {flagged} | {flagged / n:.1%} |")
    return rows


def shifted_rows(bundle: Bundle, data: Path, folder: Path) -> list[str]:
    """Rows for the frozen shifted copies of val and internal-test, with their digests checked."""
    frozen = json.loads((REPO / "benchmarks" / "robustness" / "acquisition_shift_manifest.json").read_text())
    rows = []
    for split in ("val", "internal-test"):
        out = folder / f"shifted-{split}"
        digest = build_shifted(data, split, out)
        same = "" if digest == frozen.get("splits", {}).get(split, {}).get("digest") else " (digest differs)"
        records = predict_records(bundle, [out])
        flagged = sum(r["ood"] for r in records)
        rows.append(f"| shifted {split}{same} | {len(records)} | {flagged} | {flagged / len(records):.1%} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "src" / "pneumoscan" / "bundled"))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--real", type=Path, default=None, help="a folder of real non-X-ray images")
    parser.add_argument("--per-kind", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # pydicom's notes on its own test files
    bundle = Bundle.load(args.model)
    if "ood" not in bundle.metadata:
        raise SystemExit(f"{args.model}: metadata.json has no ood block; run `pneumoscan ood` first.")
    block = bundle.metadata["ood"]
    print(
        f"OOD benchmark: model {args.model}, Mahalanobis threshold {block['mahalanobis']['threshold']:.1f} "
        f"({block['mahalanobis']['threshold_rule']}), {os.cpu_count()} cores\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        sets = non_xray_sets(bundle, Path(tmp), args.per_kind, args.seed, args.real)
        print("Non-X-rays (should be flagged):\n")
        print("| set | images | flagged | rate | lowest score | median score |\n|---|---|---|---|---|---|")
        for name, records in sets.items():
            print(row(name, records))
        everything = [r for records in sets.values() for r in records]
        print(row("**all non-X-rays**", everything))
        missed = [Path(r["path"]).name for r in everything if not r["ood"]]
        print(f"\nNot flagged: {', '.join(missed) or 'none'}\n")
        print("X-rays (should not be flagged):\n")
        print("| set | images | flagged | rate |\n|---|---|---|---|")
        splits = xray_features(bundle, args.data)
        for name in ("val", "internal-test"):
            flagged, n = flag_rate(block, *splits[name][:2])
            print(f"| {name} | {n} | {flagged} | {flagged / n:.1%} |")
        for line in held_out_rows(bundle, splits) + shifted_rows(bundle, args.data, Path(tmp)):
            print(line, flush=True)
    band = bundle.metadata["borderline"]
    print(f"\nBorderline band ({band['low']:.3f}, {band['high']:.3f}), fitted on val:\n")
    print("| split | images | inside | errors | errors inside | error rate outside |")
    print("|---|---|---|---|---|---|")
    print("\n".join(borderline_rows(bundle, splits)))


if __name__ == "__main__":
    main()
