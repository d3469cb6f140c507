"""Find the images of a chest X-ray folder and split them by patient: `pneumoscan train --data DIR`.

Layouts: `ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*` (Kaggle/Mendeley) or a single split
folder `ROOT/{NORMAL,PNEUMONIA}/*`. Splits are fixed file lists made here, before any tf.data
pipeline exists, so they never reshuffle and never leak patients or duplicate files.

`find_images` is the one rule for which files of a folder are images (also for `predict`), and
`scan` decodes each image once: given the model's input size it keeps each image's model input
(`Sample.image`), which training and evaluation use without decoding the file again, and the
image checks of the out-of-distribution flag (`Sample.colourfulness`, `Sample.aspect`).

Two validation designs (`--val-design`): `random` fills val and internal-test with patients drawn
in a seeded order; `acquisition` (the default) fills them, for the normals, with the films whose
acquisition looks most like the pneumonia films' (`pneumoscan.acquisition_stats`), the kind of normal
a screening model calls sick when the hospital's set-up changes, so that selection, calibration
and threshold are judged under that shift.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan import acquisition_stats
from pneumoscan.config import CLASS_NAMES, VAL_DESIGNS
from pneumoscan.dicom import DICOM_SUFFIXES, has_dicom_preamble
from pneumoscan.preprocess import IMAGE_SUFFIXES, ImageError, decode, resize

PATIENT_ID = re.compile(r"^(person\d+|NORMAL2-IM-\d+|IM-\d+)")
SPLIT_NAMES = ("train", "val", "internal-test")
# The official val split has 16 images; under this many, carve our own from train.
MIN_GIVEN_VAL = 100
# splits.json keeps 64-bit hash prefixes: enough to recognise a file, a third of the size.
SHORT_HASH = 16


from pneumoscan.errors import DataError  # noqa: E402  (defined in errors.py since it holds them all)


@dataclass(frozen=True)
class Sample:
    path: Path
    relpath: str  # e.g. "NORMAL/IM-0115-0001.jpeg", relative to its split folder
    label: int  # index into CLASS_NAMES
    patient: str
    sha256: str
    # The model input (S, S, 1) float32 in [0, 255], when the scan was given the input size.
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    # acquisition_stats.FEATURES of the film, when the scan was asked for them.
    statistics: np.ndarray | None = field(default=None, compare=False, repr=False)
    # The decode's image checks for the out-of-distribution flag (`preprocess.Decoded`).
    colourfulness: float = field(default=0.0, compare=False, repr=False)
    aspect: float = field(default=1.0, compare=False, repr=False)


@dataclass
class Scan:
    """The usable images of one split folder, and what was skipped."""

    root: Path
    samples: list[Sample]
    unreadable: list[str] = field(default_factory=list)
    unmatched_patient_ids: int = 0

    def report(self) -> str:
        counts = Counter(CLASS_NAMES[s.label] for s in self.samples)
        lines = [f"{self.root}: " + ", ".join(f"{counts[name]} {name}" for name in CLASS_NAMES)]
        if self.unreadable:
            first = "; ".join(self.unreadable[:3])
            lines.append(f"  skipped {len(self.unreadable)} unreadable file(s): {first}")
        if self.unmatched_patient_ids:
            lines.append(
                f"  {self.unmatched_patient_ids} file name(s) carry no patient id; each is its own group"
            )
        return "\n".join(lines)


def patient_id(file_name: str) -> str | None:
    """`person1202_bacteria_3152.jpeg` -> `person1202`; None when the name has no id."""
    match = PATIENT_ID.match(file_name)
    return match.group(1) if match else None


def find_layout(root: Path) -> dict[str, Path]:
    """Map split names (`train`, `val`, `test`) to folders; a single split folder is `train`.

    Raises:
        DataError: the folder is missing or has neither layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder.")
    if any((root / name).is_dir() for name in CLASS_NAMES):
        return {"train": root}
    splits = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    if "train" not in splits:
        raise DataError(
            f"{root}: expected class folders {'/'.join(CLASS_NAMES)} or a train/ folder holding them."
        )
    return splits


def find_images(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted: regular files with a .jpeg, .jpg,
    .png, .dcm or .dicom suffix (any case), or without a suffix but starting like a DICOM file;
    hidden files and anything inside a hidden folder are skipped."""
    folder = Path(folder)

    def is_image(path: Path) -> bool:
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES:
            return path.is_file()
        return suffix == "" and path.is_file() and has_dicom_preamble(path)

    return sorted(
        path
        for path in folder.rglob("*")
        if not any(part.startswith(".") for part in path.relative_to(folder).parts) and is_image(path)
    )


def list_images(split_dir: Path) -> list[tuple[Path, int]]:
    """(path, label) for every image file of a split folder (`find_images`), sorted.

    Raises:
        DataError: a class folder is missing or holds no images.
    """
    for name in CLASS_NAMES:
        if not (split_dir / name).is_dir():
            raise DataError(f"{split_dir / name}: class folder is missing.")
    found = []
    for label, name in enumerate(CLASS_NAMES):
        files = find_images(split_dir / name)
        if not files:
            raise DataError(f"{split_dir / name}: holds no .jpeg, .jpg or .png images (nor DICOM files).")
        found.extend((path, label) for path in files)
    return found


def scan(split_dir: Path, image_size: int | None = None, statistics: bool = False) -> Scan:
    """Read, hash and decode every image of a split folder; unreadable ones are skipped.

    Args:
        split_dir: a folder holding NORMAL/ and PNEUMONIA/.
        image_size: when given, each sample keeps its model input (`Sample.image`), made from
            this one decode, so nothing downstream decodes the file again.
        statistics: each sample keeps its acquisition statistics (`Sample.statistics`), from
            the same decode.
    """
    split_dir = Path(split_dir)
    listed = list_images(split_dir)

    def check(item: tuple[Path, int]) -> Sample | str:
        path, label = item
        try:
            data = path.read_bytes()
            decoded = decode(path, data)
        except (ImageError, OSError) as error:
            return str(error) if isinstance(error, ImageError) else f"{path}: {error.strerror}."
        return Sample(
            path=path,
            relpath=path.relative_to(split_dir).as_posix(),
            label=label,
            patient=patient_id(path.name) or "",
            sha256=hashlib.sha256(data).hexdigest(),
            image=None if image_size is None else resize(decoded.luma, image_size),
            statistics=acquisition_stats.statistics(decoded.luma) if statistics else None,
            colourfulness=decoded.colourfulness,
            aspect=decoded.aspect,
        )

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(check, listed))
    samples = [r for r in results if isinstance(r, Sample)]
    unreadable = [r for r in results if isinstance(r, str)]
    if not samples:
        raise DataError(f"{split_dir}: none of its {len(listed)} image files could be read.")
    unmatched = sum(1 for s in samples if not s.patient)
    samples = [s if s.patient else _own_group(s) for s in samples]
    return Scan(split_dir, samples, unreadable, unmatched)


def inputs(samples: list[Sample]) -> np.ndarray:
    """The samples' model inputs stacked: (n, S, S, 1) float32.

    Raises:
        ValueError: the samples were scanned without an image size.
    """
    if any(sample.image is None for sample in samples):
        raise ValueError("these samples were scanned without an image size; pass image_size to scan()")
    return np.stack([sample.image for sample in samples])


def _own_group(sample: Sample) -> Sample:
    return dataclasses.replace(sample, patient=f"file:{sample.relpath}")


def group_ids(samples: list[Sample]) -> list[int]:
    """Per sample, the index of its group: samples sharing a patient id or identical bytes, joined
    transitively. Splits keep groups whole, and the bootstrap resamples the same groups."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[str, int] = {}
    for i, sample in enumerate(samples):
        for key in (f"patient:{sample.patient}", f"bytes:{sample.sha256}"):
            if key in first_seen:
                parent[find(i)] = find(first_seen[key])
            else:
                first_seen[key] = i
    return [find(i) for i in range(len(samples))]


def _groups(samples: list[Sample]) -> list[list[Sample]]:
    members: dict[int, list[Sample]] = defaultdict(list)
    for sample, group in zip(samples, group_ids(samples), strict=True):
        members[group].append(sample)
    return list(members.values())


def split_samples(
    samples: list[Sample],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    carve_val: bool = True,
    order: dict[int, Callable[[list[Sample]], Any]] | None = None,
) -> dict[str, list[Sample]]:
    """Stratified, patient-grouped, duplicate-safe split into train / val / internal-test.

    Groups (a patient's images, joined with any byte-identical file) are ordered by a seeded
    hash of their key, or for a class in `order` by its key function; within each class, whole
    groups fill internal-test, then val, up to their share of that class's images. With the
    hash order the result depends only on file names, bytes and seed.
    """
    strata: dict[int, list[list[Sample]]] = defaultdict(list)
    for group in _groups(samples):
        labels = Counter(s.label for s in group)
        strata[max(sorted(labels), key=labels.__getitem__)].append(group)
    shares = [("internal-test", test_fraction)] + ([("val", val_fraction)] if carve_val else [])
    splits: dict[str, list[Sample]] = {name: [] for name in SPLIT_NAMES}
    taken: Counter = Counter()
    for label in sorted(strata):
        key = (order or {}).get(label, lambda g: _group_order(g, seed))
        groups = sorted(strata[label], key=key)
        total = sum(len(g) for g in groups)
        targets = [(name, round(total * share)) for name, share in shares]
        for group in groups:
            for name, target in targets:
                if taken[name, label] < target:
                    splits[name].extend(group)
                    taken[name, label] += len(group)
                    break
            else:
                splits["train"].extend(group)
    return {name: sorted(members, key=lambda s: s.relpath) for name, members in splits.items()}


def acquisition_split(
    samples: list[Sample], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[Sample]]:
    """The acquisition design: the normal patients whose films score highest on
    `acquisition_stats.out_of_fold_scores` (how pneumonia-like their acquisition looks, from a model
    that did not see them) fill internal-test, the next ones val; pneumonias as `split_samples`.

    Raises:
        ValueError: a sample was scanned without its statistics.
    """
    if any(sample.statistics is None for sample in samples):
        raise ValueError("the acquisition design needs samples scanned with statistics=True")
    labels = np.array([s.label for s in samples])
    scores = acquisition_stats.out_of_fold_scores(
        np.stack([s.statistics for s in samples]), labels, group_ids(samples), seed
    )
    by_sample = dict(zip(samples, scores, strict=True))

    def most_pneumonia_like_first(group: list[Sample]) -> tuple[float, str]:
        return -float(np.mean([by_sample[s] for s in group])), _group_order(group, seed)

    order = {CLASS_NAMES.index("NORMAL"): most_pneumonia_like_first}
    return split_samples(samples, val_fraction, test_fraction, seed, order=order)


def _group_order(group: list[Sample], seed: int) -> str:
    key = min(s.patient for s in group)
    return hashlib.sha256(f"{seed}:{key}".encode(errors="surrogateescape")).hexdigest()


def split_digest(samples: list[Sample]) -> str:
    """sha256 over the sorted `relpath sha256` lines: identifies a split's exact contents."""
    lines = sorted(f"{s.relpath} {s.sha256}" for s in samples)
    return hashlib.sha256("\n".join(lines).encode(errors="surrogateescape")).hexdigest()


@dataclass
class DataSplits:
    """The fixed file lists of one dataset, and how they were made."""

    root: Path
    splits: dict[str, list[Sample]]
    rule: dict
    scans: dict[str, Scan]
    notes: list[str] = field(default_factory=list)  # what was changed on the way, for the log

    def summary(self) -> dict:
        """The `data` block of metadata.json (see docs/metadata.md)."""
        return {
            "root": str(self.root),
            "rule": self.rule,
            "splits": {
                name: {
                    "counts": {c: sum(1 for s in members if CLASS_NAMES[s.label] == c) for c in CLASS_NAMES},
                    "digest": split_digest(members),
                }
                for name, members in self.splits.items()
            },
            "unreadable_skipped": sum(len(s.unreadable) for s in self.scans.values()),
        }

    def file_lists(self) -> dict:
        """The content of `splits.json`: every file of every split, as [relpath, sha256[:16]]."""
        return {
            "rule": self.rule,
            "splits": {
                name: [[s.relpath, s.sha256[:SHORT_HASH]] for s in members]
                for name, members in self.splits.items()
            },
        }

    def table(self) -> str:
        rows = [f"{'split':<14}" + "".join(f"{c:>11}" for c in CLASS_NAMES) + f"{'total':>8}"]
        for name, members in self.splits.items():
            counts = Counter(CLASS_NAMES[s.label] for s in members)
            rows.append(
                f"{name:<14}" + "".join(f"{counts[c]:>11}" for c in CLASS_NAMES) + f"{len(members):>8}"
            )
        return "\n".join(rows)


def load_splits(
    root: Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    image_size: int | None = None,
    design: str = "random",
    statistics: bool = False,
) -> DataSplits:
    """Scan a dataset folder and build its train / val / internal-test file lists by `design`
    (one of VAL_DESIGNS; see the module's docstring).

    With `image_size`, every sample keeps its model input (see `scan`); with `statistics` (and
    always under the acquisition design), every sample of train/ keeps its acquisition
    statistics. The acquisition design carves val from train even when the folder has a val/ of
    its own: a given val is not shifted.
    """
    if design not in VAL_DESIGNS:
        raise ValueError(f"validation design must be one of {', '.join(VAL_DESIGNS)}, got {design!r}")
    layout = find_layout(Path(root))
    train_scan = scan(layout["train"], image_size, statistics=statistics or design == "acquisition")
    scans = {"train": train_scan}
    given_val, notes, removed = None, [], 0
    if "val" in layout and design == "acquisition":
        notes.append(
            f"{layout['val']}: not used; the acquisition design carves its val split from {layout['train']}."
        )
    elif "val" in layout:
        val_scan = scan(layout["val"], image_size)
        scans["val"] = val_scan
        kept = not_overlapping(val_scan.samples, train_scan.samples)
        removed = len(val_scan.samples) - len(kept)
        if removed:
            notes.append(
                f"{layout['val']}: left out {removed} file(s) that share a patient or identical bytes "
                f"with {layout['train']} (patients must not be on both sides)."
            )
        if len(kept) >= MIN_GIVEN_VAL:
            given_val = kept
        elif val_scan.samples:
            notes.append(
                f"{layout['val']}: {len(kept)} usable image(s), under {MIN_GIVEN_VAL}; "
                "a validation split is carved from train instead."
            )
    if design == "acquisition":
        splits = acquisition_split(train_scan.samples, val_fraction, test_fraction, seed)
    else:
        splits = split_samples(
            train_scan.samples, val_fraction, test_fraction, seed, carve_val=given_val is None
        )
    if given_val is not None:
        splits["val"] = given_val
    rule = {
        "design": design,
        "method": "stratified, patient-grouped, byte-identical files kept together",
        "patient_id_regex": PATIENT_ID.pattern,
        "seed": seed,
        "val_fraction": val_fraction,
        "internal_test_fraction": test_fraction,
        "val_source": "given val/ folder" if given_val is not None else "carved from train",
        "source": {
            name: str(path.relative_to(root)) if path != Path(root) else "."
            for name, path in layout.items()
            if name != "test"
        },
    }
    if "val" in layout and design == "random":
        rule["val_overlap_removed"] = removed
    if design == "acquisition":
        rule["acquisition"] = {
            "normals": "highest out-of-fold acquisition score first: internal-test, then val",
            "features": list(acquisition_stats.FEATURES),
            "side": acquisition_stats.SIDE,
            "folds": acquisition_stats.FOLDS,
            "model": "class-balanced L2 logistic regression on standardised features, C=1",
        }
    return DataSplits(Path(root), splits, rule, scans, notes)


def not_overlapping(samples: list[Sample], others: list[Sample]) -> list[Sample]:
    """`samples` without those in a group (`group_ids`: patient id or identical bytes, joined
    transitively) that also holds one of `others`. Files without a patient id in their name are
    their own group in each folder, whatever their names."""

    def own(sample: Sample) -> Sample:
        is_file_group = sample.patient.startswith("file:")
        return dataclasses.replace(sample, patient=f"file:{sample.path}") if is_file_group else sample

    groups = group_ids([own(s) for s in [*others, *samples]])
    taken = set(groups[: len(others)])
    return [
        sample for sample, group in zip(samples, groups[len(others) :], strict=True) if group not in taken
    ]


def rebuild_splits(
    root: Path,
    rule: dict,
    digests: dict[str, str] | None = None,
    image_size: int | None = None,
    file_lists: dict | None = None,
) -> DataSplits:
    """The splits a model was trained with, rebuilt from `root`: from its file lists
    (`splits.json`) when given, else by its recorded rule.

    Raises:
        DataError: a rebuilt split's digest differs from the recorded one (other data), or a
            listed file is missing.
    """
    if file_lists is not None:
        splits = _from_file_lists(Path(root), rule, file_lists, image_size)
    else:
        splits = load_splits(
            Path(root),
            rule["val_fraction"],
            rule["internal_test_fraction"],
            rule["seed"],
            image_size,
            rule.get("design", "random"),  # runs before the key existed split at random
        )
    for name, expected in (digests or {}).items():
        if name in splits.splits and split_digest(splits.splits[name]) != expected:
            raise DataError(
                f"{root}: its {name} split differs from the one the model was trained "
                "with (other files, or other bytes); cannot rebuild it exactly."
            )
    return splits


def _from_file_lists(root: Path, rule: dict, file_lists: dict, image_size: int | None) -> DataSplits:
    layout = find_layout(root)
    from_val = rule.get("val_source") == "given val/ folder"
    scans = {"train": scan(layout["train"], image_size)}
    if from_val and "val" in layout:
        scans["val"] = scan(layout["val"], image_size)
    splits = {}
    for name, files in file_lists["splits"].items():
        folder = "val" if name == "val" and from_val else "train"
        if folder not in scans:
            raise DataError(f"{root}: has no {folder}/ folder, which the {name} split was drawn from.")
        length = len(files[0][1]) if files else SHORT_HASH
        found = {(s.relpath, s.sha256[:length]): s for s in scans[folder].samples}
        missing = [relpath for relpath, short in files if (relpath, short) not in found]
        if missing:
            raise DataError(
                f"{root}: its {name} split differs from the one the model was trained with "
                f"({len(missing)} file(s) missing or changed, e.g. {missing[0]}); cannot rebuild it exactly."
            )
        splits[name] = [found[relpath, short] for relpath, short in files]
    return DataSplits(root, splits, rule, scans)
