"""benchmarks/robustness/acquisition_shift.py: each family does what it says, plans are order-free,
builds are frozen."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, SAMPLES, SHARED_DATA, load_benchmark
from pneumoscan.config import AugmentConfig
from pneumoscan.data import load_splits, patient_id, scan, split_digest
from pneumoscan.preprocess import load_grayscale

shift = load_benchmark("robustness/acquisition_shift")

XRAY = load_grayscale(SAMPLES / "PNEUMONIA" / "person19_bacteria_61.jpeg")  # (224, 224)
RAMP = np.tile(np.arange(224, dtype=np.uint8), (224, 1))  # value = column index
FULL_RAMP = np.tile(np.arange(256, dtype=np.uint8), (64, 1))  # every grey level


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


def high_frequency(gray: np.ndarray) -> float:
    """Mean absolute difference of neighbouring pixels."""
    g = gray.astype(np.float64)
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


def unchanged_outside(src: np.ndarray, out: np.ndarray, rows: slice, cols: slice) -> bool:
    keep = np.ones(src.shape, bool)
    keep[rows, cols] = False
    return bool(np.array_equal(src[keep], out[keep]))


def check_ramp_window(out: np.ndarray, first: float, last: float) -> bool:
    """A resized window of RAMP spans columns first..last of the source."""
    row = out[112].astype(float)
    return abs(row[0] - first) <= 2 and abs(row[-1] - last) <= 2 and np.all(np.diff(row) >= 0)


FAMILY_CASES = [
    # (step, source image, check(src, out))
    ({"family": "exposure", "gain": 0.85}, XRAY, lambda s, o: o.mean() < s.mean() - 10 and o.max() < s.max()),
    ({"family": "exposure", "gain": 1.15}, XRAY, lambda s, o: o.mean() > s.mean() + 10),
    (
        {"family": "contrast", "factor": 0.8},
        XRAY,
        lambda s, o: o.std() < 0.85 * s.std() and abs(o.mean() - s.mean()) < 2,
    ),
    ({"family": "contrast", "factor": 1.25}, XRAY, lambda s, o: o.std() > 1.1 * s.std()),
    (
        {"family": "gamma", "gamma": 1.4},
        FULL_RAMP,
        lambda s, o: (
            (o.min(), o.max()) == (0, 255)
            and o.mean() < s.mean() - 10
            and np.all(np.diff(o[0].astype(int)) >= 0)
        ),
    ),
    (
        {"family": "gamma", "gamma": 0.7},
        FULL_RAMP,
        lambda s, o: (
            (o.min(), o.max()) == (0, 255)
            and o.mean() > s.mean() + 10
            and np.all(np.diff(o[0].astype(int)) >= 0)
        ),
    ),
    (
        {"family": "crop", "scale": 0.8, "x": 1.0, "y": 0.5},
        RAMP,
        lambda s, o: o.shape == s.shape and check_ramp_window(o, 0.2 * 224, 223),
    ),
    (
        {"family": "crop", "scale": 0.9, "x": 0.0, "y": 0.0},
        RAMP,
        lambda s, o: o.shape == s.shape and check_ramp_window(o, 0, 0.9 * 224),
    ),
    (
        {"family": "stretch", "axis": "width", "factor": 1.2, "offset": 0.5},
        RAMP,
        lambda s, o: (
            o.shape == s.shape and check_ramp_window(o, 224 * (1 - 1 / 1.2) / 2, 224 * (1 + 1 / 1.2) / 2)
        ),
    ),
    (
        {"family": "stretch", "axis": "height", "factor": 1.2, "offset": 0.0},
        RAMP,
        lambda s, o: o.shape == s.shape and np.array_equal(o, s),
    ),  # a vertical stretch leaves columns alone
    (
        {"family": "pad", "axis": "width", "fraction": 0.25, "before": 0.25, "fill": 7},
        XRAY,
        lambda s, o: (
            o.shape == (224, 280)
            and np.all(o[:, :14] == 7)
            and np.all(o[:, -42:] == 7)
            and np.array_equal(o[:, 14:238], s)
        ),
    ),
    (
        {"family": "pad", "axis": "height", "fraction": 0.1, "before": 0.5, "fill": 0},
        XRAY,
        lambda s, o: o.shape == (246, 224) and np.array_equal(o[11:235], s) and not o[:11].any(),
    ),
    (
        {"family": "blur", "sigma": 1.0},
        XRAY,
        lambda s, o: high_frequency(o) < 0.85 * high_frequency(s) and abs(o.mean() - s.mean()) < 1,
    ),
    (
        {"family": "noise", "sigma": 5.0, "seed": 3},
        XRAY,
        lambda s, o: 4.0 < (o.astype(float) - s).std() < 5.5 and abs((o.astype(float) - s).mean()) < 0.5,
    ),
    (
        {
            "family": "marker",
            "kind": "letter",
            "text": "L",
            "corner": "bottom-right",
            "size": 3.0,
            "value": 250,
            "margin": 0.03,
        },
        XRAY,
        lambda s, o: (
            np.sum(o[112:, 112:] == 250) > 50 and unchanged_outside(s, o, slice(112, None), slice(112, None))
        ),
    ),
    (
        {
            "family": "marker",
            "kind": "label",
            "text": "PORTABLE",
            "corner": "top-left",
            "size": 2.0,
            "value": 240,
            "margin": 0.03,
        },
        XRAY,
        lambda s, o: (
            np.sum(o[:112, :112] == 240) > 500
            and np.sum(o[:112, :112] == 0) > 50
            and unchanged_outside(s, o, slice(None, 112), slice(None, 112))
        ),
    ),
    (
        {"family": "blackout", "corner": "top-right", "width": 0.2, "height": 0.1},
        XRAY,
        lambda s, o: not o[:22, -45:].any() and unchanged_outside(s, o, slice(None, 22), slice(-45, None)),
    ),
    (
        {"family": "resample", "scale": 0.5, "down": "nearest", "up": "nearest"},
        XRAY,
        lambda s, o: (
            o.shape == s.shape and np.array_equal(o[::2, ::2], o[1::2, 1::2]) and not np.array_equal(o, s)
        ),
    ),
    (
        {"family": "resample", "scale": 0.45, "down": "box", "up": "bicubic"},
        XRAY,
        lambda s, o: o.shape == s.shape and high_frequency(o) < 0.9 * high_frequency(s),
    ),
    ({"family": "jpeg", "quality": 20}, XRAY, lambda s, o: 0.5 < np.abs(o.astype(float) - s).mean() < 6),
]


@pytest.mark.parametrize(
    "step, source, check", FAMILY_CASES, ids=[f"{c[0]['family']}-{i}" for i, c in enumerate(FAMILY_CASES)]
)
def test_each_family_changes_the_image_as_expected(step, source, check):
    params = {"steps": [step]}
    before = source.copy()
    data = shift.perturb(source, params)
    out = decode(data)
    assert np.array_equal(source, before), "shift.perturb must not modify its input"
    assert check(source, out)
    assert shift.perturb(source, params) == data  # pure: same params, same bytes
    assert data[:2] == (b"\xff\xd8" if step["family"] == "jpeg" else b"\x89P")


def test_every_family_is_tested_and_held_out_families_are_not_augmented():
    assert {case[0]["family"] for case in FAMILY_CASES} == set(shift.FAMILY_BY_NAME)
    assert set(shift.HELD_OUT_FAMILIES) == {
        "gamma",
        "stretch",
        "blur",
        "noise",
        "marker",
        "blackout",
        "pad",
        "resample",
        "jpeg",
    }
    augmented = set(AugmentConfig.__dataclass_fields__)
    assert all(f.training_counterpart in augmented for f in shift.FAMILIES if not f.held_out)
    assert all(f.training_counterpart is None for f in shift.FAMILIES if f.held_out)


def test_jpeg_quality_sets_the_file_size():
    low, high = (shift.perturb(XRAY, {"steps": [{"family": "jpeg", "quality": q}]}) for q in (15, 35))
    assert len(low) < len(high)


def test_noise_depends_on_its_seed():
    a, b = (shift.perturb(XRAY, {"steps": [{"family": "noise", "sigma": 4.0, "seed": s}]}) for s in (1, 2))
    assert a != b


def test_transform_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(4, 4, 3\)"):
        shift.transform(np.zeros((4, 4, 3), np.uint8), {"steps": []})
    with pytest.raises(ValueError, match="unknown shift family 'sepia'"):
        shift.transform(XRAY, {"steps": [{"family": "sepia"}]})


@pytest.mark.parametrize(
    "relpath, steps, expected",
    [
        (
            "PNEUMONIA/person19_bacteria_61.jpeg",
            [{"family": "blur", "sigma": 1.0}],
            "PNEUMONIA/person19_bacteria_61.png",
        ),
        ("NORMAL/IM-0115-0001.jpeg", [{"family": "jpeg", "quality": 20}], "NORMAL/IM-0115-0001.jpeg"),
        ("NORMAL/IM-0115-0001.png", [{"family": "jpeg", "quality": 20}], "NORMAL/IM-0115-0001.jpeg"),
    ],
)
def test_output_names_keep_the_patient_id(relpath, steps, expected):
    name = shift.output_relpath(relpath, {"steps": steps})
    assert name == expected and patient_id(Path(name).name) == patient_id(Path(relpath).name)


def test_plan_is_order_free_and_seed_dependent():
    samples = scan(SAMPLES).samples
    forward = shift.plan(samples, 7)
    assert shift.plan(samples[::-1], 7) == forward[::-1]
    assert shift.plan(samples, 8) != forward
    assert json.loads(json.dumps(forward)) == forward  # parameters survive the manifest
    assert all(1 <= len(p["steps"]) <= 2 for p in forward)


def test_plan_mixes_one_and_two_families_over_all_families():
    plans = [shift.plan_one(hashlib.sha256(str(i).encode()).hexdigest()) for i in range(600)]
    counts = {f.name: sum(s["family"] == f.name for p in plans for s in p["steps"]) for f in shift.FAMILIES}
    assert all(40 < n < 110 for n in counts.values()), counts  # ~75 each when uniform
    assert 240 < sum(len(p["steps"]) == 2 for p in plans) < 360
    order = [f.name for f in shift.FAMILIES]
    assert all(
        [s["family"] for s in p["steps"]] == sorted((s["family"] for s in p["steps"]), key=order.index)
        for p in plans
    )


def test_planned_perturbations_of_the_samples_stay_readable():
    for sample in scan(SAMPLES).samples:
        params = shift.plan_one(sample.sha256)
        data = shift.perturb(load_grayscale(sample.path), params)
        out = load_grayscale(sample.path.name, data)
        assert min(out.shape) >= 200 and max(out.shape) <= 290
        assert (data[:2] == b"\xff\xd8") == (shift.file_format(params) == "jpeg")


@pytest.mark.parametrize("split", ["val", "internal-test"])
def test_build_is_deterministic_and_readable(tmp_path, split):
    first = shift.build_shifted(SAMPLES, split, tmp_path / "a")
    (tmp_path / "b" / "NORMAL").mkdir(parents=True)
    (tmp_path / "b" / "NORMAL" / "stale.png").write_bytes(b"old")  # a rebuild replaces the folder whole
    assert shift.build_shifted(SAMPLES, split, tmp_path / "b") == first
    assert not (tmp_path / "b" / "NORMAL" / "stale.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    shifted = scan(tmp_path / "a")
    source = load_splits(SAMPLES, 0.1, 0.1, 1337).splits[split]
    assert split_digest(shifted.samples) == first and not shifted.unreadable
    assert sorted(s.patient for s in shifted.samples) == sorted(s.patient for s in source)
    manifest = shift.read_manifest(tmp_path / "a")
    assert manifest["digest"] == first and manifest["held_out_families"] == list(shift.HELD_OUT_FAMILIES)
    assert {f["source"] for f in manifest["files"].values()} == {s.relpath for s in source}
    assert shift.build_shifted(SAMPLES, split, tmp_path / "c", seed=1) != first


def test_build_refuses_train_and_outputs_inside_the_data(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'train'"):
        shift.build_shifted(SAMPLES, "train", tmp_path / "out")
    with pytest.raises(ValueError, match="inside the data folder"):
        shift.build_shifted(SAMPLES, "val", SAMPLES / "shifted")


@pytest.mark.fulldata
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
def test_full_val_matches_the_frozen_digest(tmp_path):
    frozen = json.loads((REPO / "benchmarks" / "robustness" / "acquisition_shift_manifest.json").read_text())
    digest = shift.build_shifted(SHARED_DATA, "val", tmp_path / "val", seed=frozen["seed"])
    manifest = shift.read_manifest(tmp_path / "val")
    assert manifest["source"]["split_digest"] == frozen["splits"]["val"]["source_split_digest"]
    assert digest == frozen["splits"]["val"]["digest"]
