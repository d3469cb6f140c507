"""pneumoscan.data: discovery, validation errors, patient-grouped and duplicate-safe splits."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import AWKWARD_BAD, AWKWARD_VALID, synthetic_xray, write_awkward, write_class_folders
from pneumoscan.config import CLASS_NAMES
from pneumoscan.data import (
    DataError,
    Sample,
    find_images,
    find_layout,
    group_ids,
    inputs,
    list_images,
    load_splits,
    not_overlapping,
    patient_id,
    scan,
    split_digest,
    split_samples,
)
from pneumoscan.preprocess import decode_to_input


@pytest.mark.parametrize(
    "file_name, expected",
    [
        ("person1202_bacteria_3152.jpeg", "person1202"),
        ("person19_virus_50.jpeg", "person19"),
        ("IM-0429-0001-0001.jpeg", "IM-0429"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0372-0001.jpeg", "NORMAL2-IM-0372"),
        ("scan_001.png", None),
        ("xperson12.jpeg", None),
    ],
)
def test_patient_id(file_name, expected):
    assert patient_id(file_name) == expected


def test_layouts(tmp_path):
    single = write_class_folders(tmp_path / "single", {"IM-0001": 0, "person1": 1}, 1)
    assert find_layout(single) == {"train": single}
    kaggle = tmp_path / "kaggle"
    for split in ("train", "val", "test"):
        write_class_folders(kaggle / split, {"IM-0001": 0, "person1": 1}, 1)
    assert find_layout(kaggle) == {name: kaggle / name for name in ("train", "val", "test")}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, "no such folder"),
        (lambda root: (root / "other").mkdir(parents=True), "expected class folders"),
        (lambda root: (root / "NORMAL").mkdir(parents=True), "PNEUMONIA: class folder is missing"),
        (
            lambda root: [(root / c).mkdir(parents=True) for c in ("NORMAL", "PNEUMONIA")],
            "NORMAL: holds no .jpeg, .jpg or .png images",
        ),
    ],
)
def test_layout_errors_name_the_path(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError, match=message) as info:
        list_images(find_layout(root)["train"])
    assert str(tmp_path) in str(info.value)


def test_suffixes_any_case_and_other_files_ignored(tmp_path):
    root = write_class_folders(tmp_path / "d", {"IM-0001": 0, "person1": 1}, 1)
    Image.fromarray(synthetic_xray(5, 0)).save(root / "NORMAL" / "IM-0002-0001.JPG", format="JPEG")
    Image.fromarray(synthetic_xray(6, 1)).save(root / "PNEUMONIA" / "person2_virus_1.PNG", format="PNG")
    (root / "NORMAL" / "notes.txt").write_text("not an image")
    (root / "NORMAL" / ".hidden.png").write_bytes(b"")
    (root / "NORMAL" / ".thumbnails").mkdir()  # a hidden folder's images are not data either
    Image.fromarray(synthetic_xray(7, 0)).save(root / "NORMAL" / ".thumbnails" / "IM-0003-0001.png")
    (root / "NORMAL" / "folder.png").mkdir()  # a folder with an image's name is not a file
    names = sorted(p.name for p, _ in list_images(root))
    assert names == ["IM-0001-0001.png", "IM-0002-0001.JPG", "person1_bacteria0.png", "person2_virus_1.PNG"]
    # predict lists folders by the same rule
    assert [p.name for p in find_images(root / "NORMAL")] == ["IM-0001-0001.png", "IM-0002-0001.JPG"]


def test_scan_keeps_each_model_input_from_its_one_decode(tmp_path):
    root = write_class_folders(tmp_path / "d", {"IM-0001": 0, "person1": 1}, 1)
    plain, sized = scan(root), scan(root, image_size=48)
    assert all(s.image is None for s in plain.samples)
    for sample in sized.samples:
        np.testing.assert_array_equal(sample.image, decode_to_input(sample.path, 48))
    assert inputs(sized.samples).shape == (2, 48, 48, 1)
    assert plain.samples == sized.samples  # the image takes no part in a sample's identity
    with pytest.raises(ValueError, match="scanned without an image size"):
        inputs(plain.samples)


def test_unreadable_files_are_reported_and_skipped(tmp_path):
    root = write_class_folders(tmp_path / "d", {"IM-0001": 0, "person1": 1, "person2": 1}, 2)
    (root / "NORMAL" / "IM-0009-0001.jpeg").write_bytes(b"")
    good = (root / "PNEUMONIA" / "person1_bacteria0.png").read_bytes()
    (root / "PNEUMONIA" / "person9_virus_1.png").write_bytes(good[: len(good) // 3])
    result = scan(root)
    assert len(result.samples) == 6
    assert len(result.unreadable) == 2
    report = result.report()
    assert "skipped 2 unreadable file(s)" in report and "IM-0009-0001.jpeg" in report


def test_names_without_patient_id_are_their_own_group(tmp_path):
    root = write_class_folders(tmp_path / "d", {"IM-0001": 0, "person1": 1}, 1)
    for k in range(3):
        Image.fromarray(synthetic_xray(50 + k, 0)).save(root / "NORMAL" / f"scan_{k}.png")
    result = scan(root)
    assert result.unmatched_patient_ids == 3
    assert len({s.patient for s in result.samples}) == 5
    assert "3 file name(s) carry no patient id" in result.report()


def _pool(tmp_path: Path, n_normal: int = 40, n_pneumonia: int = 60, per_patient: int = 3):
    patients = {f"IM-{i:04d}": 0 for i in range(n_normal)}
    patients.update({f"person{i}": 1 for i in range(n_pneumonia)})
    return scan(write_class_folders(tmp_path / "pool", patients, per_patient)).samples


def test_split_is_patient_grouped_stratified_and_sized(tmp_path):
    samples = _pool(tmp_path)
    splits = split_samples(samples, 0.1, 0.1, seed=7)
    assert sum(len(v) for v in splits.values()) == len(samples)
    owners: dict[str, set[str]] = {}
    for name, members in splits.items():
        for s in members:
            owners.setdefault(s.patient, set()).add(name)
    assert all(len(v) == 1 for v in owners.values()), "a patient landed in two splits"
    for name in ("val", "internal-test"):
        counts = Counter(s.label for s in splits[name])
        assert counts[0] == 12 and counts[1] == 18  # 10% of 120 and 180 images, whole patients


def test_split_is_deterministic_and_seeded(tmp_path):
    samples = _pool(tmp_path)
    first = split_samples(samples, 0.1, 0.1, seed=7)
    again = split_samples(list(reversed(samples)), 0.1, 0.1, seed=7)
    other = split_samples(samples, 0.1, 0.1, seed=8)
    assert {k: split_digest(v) for k, v in first.items()} == {k: split_digest(v) for k, v in again.items()}
    assert split_digest(first["val"]) != split_digest(other["val"])


def test_byte_identical_files_land_on_the_same_side(tmp_path):
    root = write_class_folders(
        tmp_path / "d", {f"person{i}": 1 for i in range(30)} | {f"IM-{i:04d}": 0 for i in range(30)}, 1
    )
    # Copies of patients' images under other patients' names (as in the real data set).
    for i in range(10):
        src = root / "PNEUMONIA" / f"person{i}_bacteria0.png"
        shutil.copy(src, root / "PNEUMONIA" / f"person{100 + i}_bacteria0.png")
    samples = scan(root).samples
    for seed in range(5):
        side = {
            s.relpath: name
            for name, members in split_samples(samples, 0.2, 0.2, seed).items()
            for s in members
        }
        for i in range(10):
            assert (
                side[f"PNEUMONIA/person{i}_bacteria0.png"] == side[f"PNEUMONIA/person{100 + i}_bacteria0.png"]
            )


VAL_SEED = 10**6  # other images than train's


def test_given_large_val_split_is_used(tmp_path):
    root = tmp_path / "kaggle"
    write_class_folders(
        root / "train", {f"IM-{i:04d}": 0 for i in range(20)} | {f"person{i}": 1 for i in range(20)}, 2
    )
    write_class_folders(
        root / "val",
        {f"IM-{i:04d}": 0 for i in range(500, 530)} | {f"person{i}": 1 for i in range(500, 530)},
        2,
        seed=VAL_SEED,
    )
    result = load_splits(root, 0.1, 0.1, seed=1)
    assert len(result.splits["val"]) == 120 and result.notes == []
    assert result.rule["val_overlap_removed"] == 0
    assert result.rule["val_source"] == "given val/ folder"
    assert all(s.path.is_relative_to(root / "train") for s in result.splits["internal-test"])


def test_tiny_given_val_split_is_replaced_by_a_carved_one(tmp_path):
    root = tmp_path / "kaggle"
    write_class_folders(
        root / "train", {f"IM-{i:04d}": 0 for i in range(20)} | {f"person{i}": 1 for i in range(20)}, 2
    )
    write_class_folders(root / "val", {"IM-0900": 0, "person900": 1}, 2, seed=VAL_SEED)
    result = load_splits(root, 0.1, 0.1, seed=1)
    assert result.rule["val_source"] == "carved from train"
    assert all(s.path.is_relative_to(root / "train") for s in result.splits["val"])
    summary = result.summary()
    assert summary["splits"]["val"]["counts"] == {"NORMAL": 4, "PNEUMONIA": 4}
    assert len(summary["splits"]["val"]["digest"]) == 64


def _kaggle_with_overlap(root: Path, val_patients: int) -> Path:
    """train/ of 40 patients, and val/ of `val_patients` new ones plus 3 files of train patients
    (a shared id) and 1 byte copy of a train image under a name with no patient id."""
    write_class_folders(
        root / "train", {f"IM-{i:04d}": 0 for i in range(20)} | {f"person{i}": 1 for i in range(20)}, 2
    )
    half = val_patients // 2
    write_class_folders(
        root / "val",
        {f"IM-{i:04d}": 0 for i in range(500, 500 + half)}
        | {f"person{i}": 1 for i in range(500, 500 + half)},
        2,
        seed=VAL_SEED,
    )
    for name in ("IM-0003-0005.png", "IM-0004-0005.png"):
        Image.fromarray(synthetic_xray(77, 0)).save(root / "val" / "NORMAL" / name)
    Image.fromarray(synthetic_xray(78, 1)).save(root / "val" / "PNEUMONIA" / "person7_virus_9.png")
    shutil.copy(
        root / "train" / "PNEUMONIA" / "person5_bacteria1.png", root / "val" / "PNEUMONIA" / "copy.png"
    )
    return root


def test_given_val_files_of_train_patients_or_bytes_are_left_out_and_said(tmp_path):
    result = load_splits(_kaggle_with_overlap(tmp_path / "kaggle", 60), 0.1, 0.1, seed=1)
    val = {s.relpath for s in result.splits["val"]}
    assert len(val) == 120 and result.rule["val_overlap_removed"] == 4
    assert not val & {"NORMAL/IM-0003-0005.png", "NORMAL/IM-0004-0005.png", "PNEUMONIA/copy.png"}
    assert "left out 4 file(s) that share a patient or identical bytes" in result.notes[0]
    train_patients = {s.patient for s in result.splits["train"] + result.splits["internal-test"]}
    assert not train_patients & {s.patient for s in result.splits["val"]}


def test_given_val_too_small_once_overlap_is_left_out_is_replaced(tmp_path):
    result = load_splits(_kaggle_with_overlap(tmp_path / "kaggle", 48), 0.1, 0.1, seed=1)  # 96 + 4
    assert result.rule["val_source"] == "carved from train"
    assert "under 100; a validation split is carved from train instead" in result.notes[-1]


def test_group_ids_join_patients_and_identical_bytes(tmp_path):
    root = write_class_folders(tmp_path / "d", {"person1": 1, "person2": 1, "person3": 1, "IM-0001": 0}, 1)
    shutil.copy(root / "PNEUMONIA" / "person1_bacteria0.png", root / "PNEUMONIA" / "person9_virus_1.png")
    samples = scan(root).samples
    ids = dict(zip((s.relpath for s in samples), group_ids(samples), strict=True))
    assert ids["PNEUMONIA/person1_bacteria0.png"] == ids["PNEUMONIA/person9_virus_1.png"]
    assert len(set(ids.values())) == 4


def test_the_awkward_corpus_is_scanned_file_by_file(tmp_path):
    root = write_class_folders(tmp_path / "d", {"IM-0001": 0, "person1": 1}, 1)
    write_awkward(root / "NORMAL" / "corpus")
    result = scan(root, image_size=32)
    listed = [
        n for n in (*AWKWARD_VALID, *AWKWARD_BAD) if Path(n).suffix.lower() in (".jpeg", ".jpg", ".png")
    ]
    names = {Path(s.relpath).name for s in result.samples}
    assert names == {*AWKWARD_VALID, "IM-0001-0001.png", "person1_bacteria0.png"}
    assert len(result.unreadable) == len(listed) - len(AWKWARD_VALID)
    for name, (_, message) in AWKWARD_BAD.items():
        if Path(name).suffix != ".gif":
            assert any(
                u.startswith(str(root / "NORMAL" / "corpus" / name)) and message in u
                for u in result.unreadable
            )
    assert all(s.image.shape == (32, 32, 1) for s in result.samples)


# ---- split invariants, for any dataset (hypothesis) ------------------------------------------


@st.composite
def _datasets(draw) -> list[Sample]:
    """Patients of either class with 1-3 images, some names without a patient id, and some files
    byte-identical to another patient's (as the real data set has)."""
    n_patients = draw(st.integers(4, 40))
    samples = []
    for index in range(n_patients):
        label = draw(st.integers(0, 1))
        named = draw(st.booleans()) or index % 5
        for k in range(draw(st.integers(1, 3))):
            patient = (f"person{index}" if label else f"IM-{index:04d}") if named else ""
            relpath = f"{CLASS_NAMES[label]}/{patient or 'scan'}-{index}-{k}.png"
            samples.append(
                Sample(Path(relpath), relpath, label, patient or f"file:{relpath}", f"{index}-{k}")
            )
    for _ in range(draw(st.integers(0, len(samples) // 3))):  # byte copies across patients
        source, copy = draw(st.integers(0, len(samples) - 1)), draw(st.integers(0, len(samples) - 1))
        samples[copy] = dataclasses.replace(samples[copy], sha256=samples[source].sha256)
    return samples


def _group_of(samples: list[Sample]) -> dict[str, int]:
    return dict(zip((s.relpath for s in samples), group_ids(samples), strict=True))


@settings(max_examples=60, deadline=None)
@given(_datasets(), st.floats(0.05, 0.3), st.floats(0.05, 0.3), st.integers(0, 2**16), st.booleans())
def test_no_patient_or_byte_group_is_in_two_splits(samples, val_fraction, test_fraction, seed, carve_val):
    splits = split_samples(samples, val_fraction, test_fraction, seed, carve_val=carve_val)
    placed = [s.relpath for members in splits.values() for s in members]
    assert sorted(placed) == sorted(s.relpath for s in samples)  # each file once
    group = _group_of(samples)
    sides = {}
    for name, members in splits.items():
        for sample in members:
            assert sides.setdefault(group[sample.relpath], name) == name, "a group spans two splits"
    assert carve_val or not splits["val"]
    shuffled = split_samples(list(reversed(samples)), val_fraction, test_fraction, seed, carve_val=carve_val)
    assert {k: [s.relpath for s in v] for k, v in shuffled.items()} == {
        k: [s.relpath for s in v] for k, v in splits.items()
    }  # independent of file order


@settings(max_examples=60, deadline=None)
@given(_datasets(), _datasets())
def test_a_given_val_keeps_nothing_of_trains_groups(train, val):
    val = [dataclasses.replace(s, path=Path("val") / s.path) for s in val]  # another folder
    train = [dataclasses.replace(s, path=Path("train") / s.path) for s in train]
    kept = not_overlapping(val, train)
    train_patients = {s.patient for s in train if not s.patient.startswith("file:")}
    train_bytes = {s.sha256 for s in train}
    assert not any(s.patient in train_patients or s.sha256 in train_bytes for s in kept)
    assert {s.relpath for s in kept} <= {s.relpath for s in val}
