"""pneumoscan.export: every format of the bundle loads and gives the run's outputs."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import SAMPLES, raw_with_copies
from pneumoscan.bundle import Bundle
from pneumoscan.cli import main
from pneumoscan.metadata import read, write
from pneumoscan.preprocess import decode_to_input
from pneumoscan.tfjs import named_weights, read_weights

IMAGES = sorted(SAMPLES.rglob("*.jpeg"))[:4]


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory):
    _, run_dir = trained_run
    out = tmp_path_factory.mktemp("bundles") / "bundle"
    assert main(["export", "--model", str(run_dir), "--out", str(out)]) == 0
    return run_dir, out


def test_export_prints_no_library_advice(trained_run, tmp_path):
    """Keras advises through absl that HDF5 is legacy; the command's stderr is its own."""
    _, run_dir = trained_run
    command = [sys.executable, "-m", "pneumoscan", "export", "--model", str(run_dir), "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    assert "WARNING" not in result.stderr and "Bundle:" in result.stdout


def test_bundle_holds_every_format(bundle):
    _, out = bundle
    assert {p.name for p in out.iterdir()} == {
        "model.keras",
        "saved_model",
        "model.h5",
        "tfjs",
        "model.tflite",
        "metadata.json",
        "splits.json",
    }
    assert sorted(p.name for p in (out / "tfjs").iterdir()) == ["group1-shard1of1.bin", "model.json"]
    meta = read(out)
    assert meta["export"]["quantize"] == "none"
    assert meta["export"]["formats"] == ["keras", "saved_model", "h5", "tfjs", "tflite"]
    assert meta["export"]["tfjs_bytes"] == sum(p.stat().st_size for p in (out / "tfjs").iterdir())


def test_every_format_gives_the_same_outputs(bundle):
    run_dir, out = bundle
    x = np.stack([decode_to_input(p, 64) for p in IMAGES])
    expected = keras.models.load_model(run_dir / "model.keras").predict(x, verbose=0)
    from_keras = keras.models.load_model(out / "model.keras").predict(x, verbose=0)
    from_h5 = keras.models.load_model(out / "model.h5", compile=False).predict(x, verbose=0)
    saved = tf.saved_model.load(str(out / "saved_model"))  # keep a reference: it owns the variables
    from_saved = saved.serve(tf.constant(x)).numpy()
    with h5py.File(out / "model.h5") as handle:
        assert "model_weights" in handle
    for got in (from_keras, from_h5, from_saved):
        np.testing.assert_allclose(got, expected, atol=1e-6)
    # The LiteRT flatbuffer: its raw output, and the inner layers metadata.json's export block names.
    from ai_edge_litert.interpreter import Interpreter

    block = read(out)["export"]["litert"]
    runner = Interpreter(model_path=str(out / block["file"])).get_signature_runner(block["signature"])
    outputs = runner(**{block["input"]: x})
    assert set(outputs) == set(block["outputs"]) and "raw" in outputs
    np.testing.assert_allclose(outputs["raw"], expected, atol=1e-5)
    model = keras.models.load_model(run_dir / "model.keras")
    for name in set(block["outputs"]) - {"raw", "cam"}:
        inner = keras.Model(model.inputs, model.get_layer(name).output).predict(x, verbose=0)
        np.testing.assert_allclose(outputs[name], inner, atol=1e-5)


@pytest.mark.parametrize("quantize, nbytes_ratio", [("float16", 0.5), ("uint8", 0.25)])
def test_quantized_exports_shrink_the_weights(bundle, tmp_path, quantize, nbytes_ratio):
    run_dir, out = bundle
    small = tmp_path / quantize
    assert main(["export", "--model", str(run_dir), "--out", str(small), "--quantize", quantize]) == 0

    def shard_bytes(folder):
        return sum(p.stat().st_size for p in (folder / "tfjs").glob("group1-shard*"))

    assert shard_bytes(small) == pytest.approx(nbytes_ratio * shard_bytes(out), abs=16)
    model = keras.models.load_model(run_dir / "model.keras")
    weights = read_weights(small / "tfjs")
    for name, variable in named_weights(model):
        values = variable.numpy()
        if quantize == "float16":  # half a float16 unit in the last place (or its subnormal step)
            bound = np.abs(values) * 2.0**-11 + 2.0**-25
        else:  # one affine step of the tensor's range
            bound = (values.max() - values.min()) / 255 + 1e-7
        assert np.all(np.abs(weights[name] - values) <= bound), name
    # Keras, SavedModel and HDF5 carry the same rounded weights as TF.js.
    rounded = keras.models.load_model(small / "model.keras")
    for name, variable in named_weights(rounded):
        np.testing.assert_array_equal(variable.numpy(), weights[name])
    assert read(small)["export"]["weights"] == f"{quantize}-rounded in every format"
    # ... and so does the LiteRT flatbuffer (float32 storage of the rounded values).
    x = np.stack([decode_to_input(p, 64) for p in IMAGES])
    litert = Bundle.load(small, runtime="litert").forward(x)
    np.testing.assert_allclose(litert, raw_with_copies(rounded, x, read(small)), atol=1e-5)


def test_add_litert_gives_an_older_bundle_its_flatbuffer_and_changes_nothing_else(bundle, tmp_path, capsys):
    _, out = bundle
    older = tmp_path / "older"
    shutil.copytree(out, older)
    (older / "model.tflite").unlink()
    meta = read(older)
    del meta["export"]["litert"]
    write(older, meta)
    assert Bundle.load(older).runtime is None  # made before: Keras runs it
    before = {p.relative_to(older): p.read_bytes() for p in older.rglob("*") if p.is_file()}
    assert main(["export", "--model", str(older), "--out", str(older), "--add-litert"]) == 0
    after = {p.relative_to(older): p.read_bytes() for p in older.rglob("*") if p.is_file()}
    assert set(after) - set(before) == {Path("model.tflite")}
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {Path("metadata.json")}
    new = read(older)
    assert new["export"]["litert"]["sha256"] == hashlib.sha256(after[Path("model.tflite")]).hexdigest()
    del new["export"]["litert"]
    assert new == {"heatmap": meta.get("heatmap", new.get("heatmap")), **meta}  # nothing else changed
    assert Bundle.load(older).runtime is not None


def test_add_litert_refuses_a_run_folder(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    assert main(["export", "--model", str(run_dir), "--out", str(tmp_path / "b"), "--add-litert"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a run folder, not an exported bundle" in err and "\n" not in err


def test_export_refuses_a_folder_that_is_not_a_bundle(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", "--model", str(run_dir), "--out", str(tmp_path)]) == 2
    assert "holds no model bundle" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_export_replaces_an_older_bundle_whole(bundle, trained_run):
    run_dir, out = bundle
    stale = out / "tfjs" / "group1-shard9of9.bin"
    stale.write_bytes(b"old")
    assert main(["export", "--model", str(run_dir), "--out", str(out)]) == 0
    assert not stale.exists()
    json.loads((out / "tfjs" / "model.json").read_text())
