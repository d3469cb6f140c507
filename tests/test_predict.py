"""pneumoscan.predict: streaming predictions, formats, and one clear record per bad input."""

from __future__ import annotations

import csv
import io
import json
import shutil

import keras
import numpy as np
from PIL import Image

from conftest import SAMPLES, synthetic_xray
from pneumoscan import bundle as bundle_module
from pneumoscan.calibrate import apply_calibration
from pneumoscan.cli import main
from pneumoscan.metadata import read
from pneumoscan.predict import predict_files
from pneumoscan.preprocess import decode_to_input

GRAY = synthetic_xray(3, 1, size=(120, 100))
RGB = np.dstack([GRAY, GRAY // 2, 255 - GRAY])


def _save(path, image: Image.Image, **options):
    image.save(path, **options)
    return path


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


UNUSUAL = {
    "gray16.png": lambda p: _save(p, Image.fromarray(GRAY.astype(np.uint16) * 257)),
    "rgba.png": lambda p: _save(p, Image.fromarray(np.dstack([RGB, np.full(GRAY.shape, 90, np.uint8)]))),
    "palette.png": lambda p: _save(p, Image.fromarray(RGB).quantize(32)),
    "cmyk.jpeg": lambda p: _save(p, Image.fromarray(RGB).convert("CMYK"), format="JPEG"),
    "rotated.jpeg": lambda p: _save(p, Image.fromarray(GRAY), format="JPEG", exif=_exif(6)),
    "upper.JPG": lambda p: _save(p, Image.fromarray(GRAY), format="JPEG"),
}

BAD = {
    "empty.jpeg": (lambda p: p.write_bytes(b""), "the file is empty"),
    "notes.png": (lambda p: p.write_text("hello"), "is not a JPEG or PNG image"),
    "truncated.jpeg": (
        lambda p: p.write_bytes((SAMPLES / "NORMAL" / "IM-0115-0001.jpeg").read_bytes()[:700]),
        "truncated or corrupt",
    ),
    "bomb.png": (lambda p: _save(p, Image.new("L", (9000, 6000))), "over the 50 MP limit"),
    "icon.png": (lambda p: _save(p, Image.new("L", (20, 20))), "too small to be a chest X-ray"),
    "anim.gif": (lambda p: _save(p, Image.fromarray(GRAY), format="GIF"), "only JPEG and PNG"),
}


def test_probabilities_match_the_model_and_metadata(trained_run):
    _, run_dir = trained_run
    paths = sorted(SAMPLES.rglob("*.jpeg"))[:5]
    records = predict_files(run_dir, paths, batch_size=2)
    meta = read(run_dir)
    model = keras.models.load_model(run_dir / "model.keras")
    raw = model.predict(np.stack([decode_to_input(p, 64) for p in paths]), verbose=0).reshape(-1)
    expected = apply_calibration(raw, meta["calibration"])
    assert [r["path"] for r in records] == [str(p) for p in paths]
    np.testing.assert_allclose([r["probability"] for r in records], expected, atol=1e-6)
    for r in records:
        assert r["threshold"] == meta["threshold"]["value"]
        assert r["label"] == ("PNEUMONIA" if r["probability"] >= r["threshold"] else "NORMAL")


def test_batch_size_does_not_change_results(trained_run):
    _, run_dir = trained_run
    one = predict_files(run_dir, [SAMPLES], batch_size=1)
    seven = predict_files(run_dir, [SAMPLES], batch_size=7)
    assert len(one) == 16
    np.testing.assert_allclose([r["probability"] for r in one], [r["probability"] for r in seven], atol=1e-6)


def test_unusual_but_valid_images_are_predicted(trained_run, tmp_path):
    _, run_dir = trained_run
    for name, make in UNUSUAL.items():
        make(tmp_path / name)
    records = predict_files(run_dir, [tmp_path])
    assert sorted(r["path"].rsplit("/", 1)[1] for r in records) == sorted(UNUSUAL)
    assert all("error" not in r and 0 <= r["probability"] <= 1 for r in records), records


def test_bad_inputs_each_get_one_sentence_and_the_rest_go_on(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    folder = tmp_path / "batch"
    folder.mkdir()
    for name, (make, _) in BAD.items():
        make(folder / name)
    good = shutil.copy(SAMPLES / "PNEUMONIA" / "person19_bacteria_61.jpeg", folder / "good.jpeg")
    args = [
        "predict",
        "--model",
        str(run_dir),
        "--format",
        "json",
        str(tmp_path / "missing.png"),
        str(folder / "empty.jpeg"),
        str(folder / "good.jpeg"),
        str(folder / "notes.png"),
        str(folder / "anim.gif"),
        str(folder / "truncated.jpeg"),
        str(folder / "bomb.png"),
        str(folder / "icon.png"),
        str(tmp_path / "nothing_here"),
    ]
    (tmp_path / "nothing_here").mkdir()
    assert main(args) == 1
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert [r["path"] for r in records] == args[5:]
    by_name = {r["path"].rsplit("/", 1)[1]: r for r in records}
    assert (
        by_name["good.jpeg"]["label"] in ("NORMAL", "PNEUMONIA") and str(good) == by_name["good.jpeg"]["path"]
    )
    assert "no such file or folder" in by_name["missing.png"]["error"]
    assert "folder holds no .jpeg" in by_name["nothing_here"]["error"]
    for name, (_, message) in BAD.items():
        error = by_name[name]["error"]
        assert message in error and name in error and "\n" not in error
    assert "Traceback" not in err and "1 image(s) predicted" in err and "8 failed" in err


def test_formats(trained_run, capsys):
    _, run_dir = trained_run
    files = [str(p) for p in sorted(SAMPLES.rglob("*.jpeg"))[:3]]
    assert main(["predict", "--model", str(run_dir), "--format", "csv", *files]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["path"] for r in rows] == files
    assert set(rows[0]) == {"path", "label", "probability", "threshold", "error"}
    assert main(["predict", "--model", str(run_dir), *files]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["path", "label", "p(pneumonia)", "threshold"] and len(table) == 4


def test_missing_model_without_a_bundle_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(bundle_module, "bundled_dir", lambda: None)
    assert main(["predict", str(SAMPLES)]) == 2
    assert "no --model given and this installation has no bundled model" in capsys.readouterr().err


def test_not_a_model_folder(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path), str(SAMPLES)]) == 2
    assert "not a model folder" in capsys.readouterr().err
