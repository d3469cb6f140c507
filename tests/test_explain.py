"""pneumoscan.explain: occlusion maps land where a hand-built model reads, region shares,
marker sensitivity, overlays for files, and stability of the trained fixture model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import CHECKER, SAMPLES, S, hand_built, load_benchmark, raw_with_copies, window_reader
from pneumoscan.bundle import Bundle
from pneumoscan.cli import main
from pneumoscan.explain import (
    explain_files,
    occlusion_map,
    region_masks,
    region_shares,
    render,
    save_overlay,
)
from pneumoscan.heatmap import class_activation_map, grad_cam, heatmap_peak
from pneumoscan.model import heatmap_spec
from pneumoscan.preprocess import decode_to_input


def _gap_model() -> Bundle:
    """sigmoid(4 * mean(conv1x1(x / 255)) - 2): Grad-CAM must follow the bright pixels."""
    inputs = keras.Input((S, S, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(1, 1, name="features")(x)  # (batch, 64, 64, 1)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="out")(x))
    model.get_layer("features").set_weights([np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)])
    model.get_layer("out").set_weights([np.full((1, 1), 4.0, np.float32), np.array([-2.0], np.float32)])
    return hand_built(model)


def _mass(saliency: np.ndarray, rows: slice, cols: slice) -> float:
    positive = np.clip(saliency, 0, None)
    return float(positive[rows, cols].sum() / positive.sum())


# name, window the model reads, {share: (low, high)}. Patches (8 px, stride 4) that straddle
# the window spread its evidence up to 4 px beyond it, hence the margins on the corner cases.
OCCLUSION_CASES = [
    (
        "top-left corner",
        (slice(0, 8), slice(0, 8)),
        {"corner_share": (0.85, 1.0), "border_share": (0.85, 1.0), "centre_share": (0.0, 0.0)},
    ),
    (
        "bottom-right corner",
        (slice(56, 64), slice(56, 64)),
        {"corner_share": (0.85, 1.0), "border_share": (0.85, 1.0), "centre_share": (0.0, 0.0)},
    ),
    (
        "top edge, left of centre",
        (slice(0, 8), slice(16, 24)),  # not symmetric: catches a transpose
        {"corner_share": (0.0, 0.0), "border_share": (0.5, 1.0), "centre_share": (0.0, 0.15)},
    ),
    (
        "centre",
        (slice(24, 40), slice(24, 40)),
        {"corner_share": (0.0, 0.0), "border_share": (0.0, 0.0), "centre_share": (1.0, 1.0)},
    ),
    (
        "top-left quadrant",
        (slice(0, 32), slice(0, 32)),
        {"corner_share": (0.1, 0.3), "centre_share": (0.3, 0.6)},
    ),
]


@pytest.mark.parametrize("name, window, expected", OCCLUSION_CASES, ids=[c[0] for c in OCCLUSION_CASES])
def test_occlusion_puts_the_mass_where_the_model_reads(name, window, expected):
    saliency = occlusion_map(window_reader(*window), CHECKER, patch=8, stride=4)
    assert saliency.shape == (S, S) and np.all(np.isfinite(saliency))
    rows, cols = window
    assert _mass(saliency, rows, cols) > 0.6  # most mass in the window itself (0.69-0.90) ...
    grown = (slice(max(rows.start - 4, 0), rows.stop + 4), slice(max(cols.start - 4, 0), cols.stop + 4))
    assert _mass(saliency, *grown) > 0.999  # ... and none beyond the patches that touch it
    shares = region_shares(saliency)
    for share, (low, high) in expected.items():
        assert low - 1e-6 <= shares[share] <= high + 1e-6, (share, shares)


def test_occlusion_default_patch_and_argument_errors():
    model = window_reader(slice(24, 40), slice(24, 40))
    assert occlusion_map(model, CHECKER).shape == (S, S)  # patch S // 8, stride patch // 2
    with pytest.raises(ValueError, match=r"\(64, 64, 1\) model input; got shape \(32, 32, 1\)"):
        occlusion_map(model, CHECKER[:32, :32])
    with pytest.raises(ValueError, match="fill 'blur' is unknown"):
        occlusion_map(model, CHECKER, fill="blur")
    with pytest.raises(ValueError, match="patch must be in"):
        occlusion_map(model, CHECKER, patch=0)


def test_zero_fill_reverses_the_sign_on_a_bright_window():
    # Occluding with black lowers the output wherever the window is bright: no negative values.
    saliency = occlusion_map(window_reader(slice(24, 40), slice(24, 40)), CHECKER + 10, patch=8, fill="zero")
    assert saliency.min() > -1e-6 and saliency[32, 32] > 0


_half, _ring = np.zeros((S, S)), np.zeros((S, S))
_half[:, : S // 2] = 1.0
_ring[:3, :] = 1.0
# name, map, expected {corner, border, centre} shares
SHARE_CASES = [
    ("one top-left pixel", np.pad([[1.0]], ((0, S - 1), (0, S - 1))), (1.0, 1.0, 0.0)),
    ("one centre pixel", np.pad([[1.0]], ((32, S - 33), (32, S - 33))), (0.0, 0.0, 1.0)),
    ("uniform", np.ones((S, S)), (4 * 10 * 10 / S**2, 1 - 52 * 52 / S**2, 44 * 38 / S**2)),
    (
        "negatives ignored",
        np.ones((S, S)) - 2 * _half,
        (2 * 10 * 10 / (S * S / 2), 1 - 52 * 26 / (S * S / 2), 44 * 19 / (S * S / 2)),
    ),
    ("top rows", _ring, (2 * 10 * 3 / (3 * S), 1.0, 0.0)),
    ("all zero", np.zeros((S, S)), (0.0, 0.0, 0.0)),
    ("all negative", -np.ones((S, S)), (0.0, 0.0, 0.0)),
]


@pytest.mark.parametrize("name, saliency, expected", SHARE_CASES, ids=[c[0] for c in SHARE_CASES])
def test_region_shares_table(name, saliency, expected):
    shares = region_shares(saliency)
    assert [shares["corner_share"], shares["border_share"], shares["centre_share"]] == pytest.approx(
        expected, abs=1e-12
    )


def test_region_masks_geometry_and_errors():
    masks = region_masks(160)
    assert masks["corner"].sum() == 4 * 24 * 24  # 15% of 160
    assert masks["border"].sum() == 160**2 - 128**2  # 16 px band
    assert masks["centre"].sum() == 112 * 96 and masks["centre"][24, 32] and not masks["centre"][23, 32]
    assert region_masks(160, border=0.0)["border"].sum() == 0
    with pytest.raises(ValueError, match="square"):
        region_shares(np.ones((4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        region_shares(np.full((4, 4), np.nan))


def test_grad_cam_follows_the_features_and_needs_a_pooling_layer():
    image = np.zeros((S, S, 1), np.float32)
    image[:32, :32] = 200.0
    cam = grad_cam(_gap_model(), image)
    assert cam.shape == (S, S) and cam.max() == pytest.approx(1.0)
    assert _mass(cam, slice(0, 34), slice(0, 34)) > 0.99
    assert grad_cam(window_reader(slice(0, 8), slice(0, 8)), image) is None


def test_grad_cam_on_pneumonet():
    """pneumonet pools its last feature map and has one dense unit, so Grad-CAM's channel weights
    are that unit's kernel times one positive number: its map must be the ReLU of the exact CAM
    (`class_activation_map`), upsampled and scaled to its maximum; and it depends on the film."""
    import tensorflow as tf

    from pneumoscan.model import build_pneumonet

    keras.utils.set_random_seed(3)
    bundle = hand_built(build_pneumonet(S))
    film = decode_to_input(SAMPLES / "PNEUMONIA" / "person19_bacteria_61.jpeg", S)
    maps = []
    for image in (CHECKER, film):
        cam = grad_cam(bundle, image)
        assert cam.shape == (S, S) and np.all(np.isfinite(cam)) and 0.0 <= cam.min() <= cam.max() <= 1.0
        cells, method = class_activation_map(bundle, image)
        assert method == "cam" and cells.max() > 0 and np.ptp(cells) > 0.1 * cells.max()  # not flat
        upsampled = tf.image.resize(np.maximum(cells, 0)[..., None], (S, S), method="bilinear").numpy()[
            ..., 0
        ]
        np.testing.assert_allclose(cam, upsampled / upsampled.max(), atol=1e-5)
        maps.append(cam)
    assert np.abs(maps[0] - maps[1]).max() > 0.1


def test_explain_files_writes_overlays_and_error_records(trained_run, tmp_path):
    _, run_dir = trained_run
    inputs = tmp_path / "in"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    good = SAMPLES / "NORMAL" / "IM-0115-0001.jpeg"
    shutil.copy(good, inputs / "a" / "same.jpeg")
    shutil.copy(SAMPLES / "PNEUMONIA" / "person19_bacteria_61.jpeg", inputs / "b" / "same.jpeg")
    (inputs / "empty.jpeg").write_bytes(b"")
    (inputs / "notes.png").write_text("hello")
    paths = [
        good,
        inputs / "empty.jpeg",
        inputs / "a" / "same.jpeg",
        inputs / "missing.png",
        inputs / "b" / "same.jpeg",
        inputs / "notes.png",
    ]
    records = explain_files(run_dir, paths, tmp_path / "out", method="occlusion")
    assert [r["path"] for r in records] == [str(p) for p in paths]
    assert [("error" in r) for r in records] == [False, True, False, True, False, True]
    assert "the file is empty" in records[1]["error"] and str(paths[1]) in records[1]["error"]
    assert "no such file" in records[3]["error"] and "not a JPEG, PNG or DICOM" in records[5]["error"]
    pngs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert pngs == ["IM-0115-0001_occlusion.png", "same-2_occlusion.png", "same_occlusion.png"]
    bundle = Bundle.load(run_dir)
    x = decode_to_input(good, bundle.image_size)
    expected = float(bundle.calibrated(raw_with_copies(bundle.model, x[None], bundle.metadata))[0])
    assert records[0]["probability"] == pytest.approx(expected, abs=1e-5)
    for record in (records[0], records[2], records[4]):
        assert all(0.0 <= record[k] <= 1.0 for k in ("corner_share", "border_share", "centre_share"))
        with Image.open(record["png"]) as png:
            assert png.format == "PNG" and max(png.size) <= 400
    table = render(records).splitlines()
    assert len(table) == 1 + len(paths) and "ERROR" in table[2] and "the file is empty" in table[2]


# name, grid, expected [x, y]
PEAK_CASES = [
    ("one hot cell", np.pad([[1.0]], ((1, 3), (2, 2))), [0.5, 0.3]),  # (5, 5): row 1, col 2
    ("two equal cells: between them", np.array([[0, 0, 0, 0], [1, 0, 0, 1]], float), [0.5, 0.75]),
    (
        "a near tie moves it a little, not a cell",
        np.array([[0, 0, 0, 0], [1, 0, 0, 0.98]], float),
        [0.497, 0.75],
    ),
    ("below half the maximum does not count", np.array([[0.49, 0, 0], [0, 0, 1]], float), [5 / 6, 0.75]),
    ("negative maps are shifted by their minimum", np.array([[-3.0, -1.0], [-3.0, -3.0]]), [0.75, 0.25]),
    ("a flat map points at the centre", np.zeros((3, 4)), [0.5, 0.5]),
]


@pytest.mark.parametrize("name, grid, expected", PEAK_CASES, ids=[c[0] for c in PEAK_CASES])
def test_heatmap_peak_table(name, grid, expected):
    assert heatmap_peak(grid) == pytest.approx(expected, abs=2e-3)


def test_cam_is_exact_where_the_model_ends_in_pooling_and_one_unit():
    """The mean of the CAM cells plus the output bias is the model's logit; Grad-CAM elsewhere."""
    from pneumoscan.model import build_pneumonet, build_seed

    bundle = hand_built(build_pneumonet(S))
    spec = heatmap_spec(bundle.model)
    assert (spec["method"], spec["feature_layer"], spec["weights_layer"]) == (
        "cam",
        "stage3_out",
        "pneumonia",
    )
    grid, method = class_activation_map(bundle, CHECKER)
    p = float(bundle.forward(CHECKER[np.newaxis])[0])
    bias = bundle.model.get_layer("pneumonia").get_weights()[1][0]
    assert method == "cam" and grid.shape == (2, 2)  # 64 px: 16, 8, 4, 2
    assert grid.mean() + bias == pytest.approx(np.log(p / (1 - p)), abs=1e-4)
    seed = hand_built(build_seed(S))
    grid, method = class_activation_map(seed, CHECKER)
    assert method == "grad-cam" and grid.shape == (2, 2) and np.all(grid >= 0)  # pool4 of 64 px


def test_cam_of_a_model_that_reads_one_window_peaks_there():
    """sigmoid(mean(conv1x1(x)) ...) on an image bright in its top-left quadrant: the map's peak
    falls in that quadrant."""
    image = np.zeros((S, S, 1), np.float32)
    image[:24, :24] = 200.0
    grid, method = class_activation_map(_gap_model(), image)
    x, y = heatmap_peak(grid)
    assert method == "cam" and x < 0.4 and y < 0.4


def test_explain_cli_json_contract(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    good, bad = SAMPLES / "NORMAL" / "IM-0115-0001.jpeg", tmp_path / "empty.png"
    bad.write_bytes(b"")
    out = tmp_path / "maps"
    assert (
        main(["explain", "--model", str(run_dir), "--format", "json", "--out", str(out), str(good), str(bad)])
        == 1
    )
    records = json.loads(capsys.readouterr().out)
    assert set(records[0]) >= {"path", "probability", "label", "heatmap_peak", "heatmap_png"}
    assert records[0]["label"] in ("NORMAL", "PNEUMONIA") and len(records[0]["heatmap_peak"]) == 2
    assert all(0.0 <= v <= 1.0 for v in records[0]["heatmap_peak"])
    assert (
        Path(records[0]["heatmap_png"]) == out / "IM-0115-0001_cam.png"
        and Path(records[0]["heatmap_png"]).is_file()
    )
    assert set(records[1]) == {"path", "error"} and "the file is empty" in records[1]["error"]


def test_explain_passes_on_the_dicom_header_warnings_predict_gives(tmp_path, capsys):
    from conftest import write_dicom
    from pneumoscan.preprocess import load_grayscale

    path = write_dicom(
        tmp_path / "lateral.dcm", load_grayscale(SAMPLES / "NORMAL" / "IM-0115-0001.jpeg"), ViewPosition="LL"
    )
    assert main(["predict", "--format", "json", str(path)]) == 0
    predicted = json.loads(capsys.readouterr().out)[0]["warning"]
    assert main(["explain", "--format", "json", "--out", str(tmp_path / "maps"), str(path)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["warning"] == predicted
    assert predicted.startswith(f"{path}: the header says the view is lateral (LL)")
    assert f"pneumoscan: warning: {predicted}" in err


def test_an_overlay_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure while the PNG is being written leaves the earlier overlay as it was, and no
    temporary file beside it."""
    from PIL import Image

    png = tmp_path / "x_cam.png"
    png.write_bytes(b"the earlier overlay")

    def failing(self, target, *args, **kwargs):
        if isinstance(target, str | Path):
            Path(target).write_bytes(b"half")
        else:
            target.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing)
    with pytest.raises(OSError):
        save_overlay(np.zeros((40, 40), np.uint8), np.ones((5, 5)), png)
    assert png.read_bytes() == b"the earlier overlay"
    assert [p.name for p in tmp_path.iterdir()] == ["x_cam.png"]


def test_explain_carries_the_flags_of_its_label(tmp_path, capsys):
    """Issue 23: a photograph the bundled model's rule flags gets `ood`, `borderline` and
    `threshold` in explain's JSON, as predict gives them, and its overlay's title and the table
    say it; the keys explain had are all still there."""
    from pneumoscan.predict import predict_files

    nonxray = load_benchmark("trust/nonxray")
    photo, xray = tmp_path / "photo.png", SAMPLES / "NORMAL" / "IM-0115-0001.jpeg"
    Image.fromarray(nonxray.generate(nonxray.KINDS[0], 0)).save(photo)
    out = tmp_path / "maps"
    assert main(["explain", "--format", "json", "--out", str(out), str(photo), str(xray)]) == 0
    records = json.loads(capsys.readouterr().out)
    predicted = predict_files(None, [photo, xray])
    for record, expected in zip(records, predicted, strict=True):
        assert set(record) >= {"path", "probability", "label", "heatmap_peak", "heatmap_png", "png"}
        assert set(record) >= {"centre_share", "border_share", "corner_share", "marker_sensitivity"}
        for key in ("threshold", "borderline", "ood"):
            assert record[key] == expected[key], (key, record, expected)
        assert record["ood_score"] == pytest.approx(expected["ood_score"], rel=1e-6)
    assert records[0]["ood"] is True and records[1]["ood"] is False
    assert main(["explain", "--out", str(out), str(photo), str(xray)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "NOT A CHEST X-RAY?" in table[1] and "NOT A CHEST X-RAY?" not in table[2]
