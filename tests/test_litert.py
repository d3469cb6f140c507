"""pneumoscan.litert: the bundle's LiteRT flatbuffer gives the records Keras gives (raw outputs
within 1e-5; the same labels, flags and JSON keys) over the samples and the awkward corpus, with
and without the test-time copies; predict then runs without importing TensorFlow; a bundle
without the flatbuffer still runs on Keras, and a flatbuffer that is not the exported one is
refused in one sentence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import CHECKER, REPO, SAMPLES, S, raw_with_copies, window_reader, write_awkward
from pneumoscan import litert, stream
from pneumoscan.bundle import Bundle, bundled_dir
from pneumoscan.cli import main
from pneumoscan.heatmap import class_activation_map
from pneumoscan.metadata import TEST_TIME_COMBINE, read, write
from pneumoscan.predict import expand_paths, iter_predictions, verdicts
from pneumoscan.preprocess import decode_to_input

RAW_TOLERANCE = 1e-5  # issue 22: LiteRT = Keras within 1e-5
SAMPLE_PATHS = sorted(SAMPLES.rglob("*.jpeg"))


@pytest.fixture(scope="module")
def engines():
    """The bundled model twice: on its flatbuffer, and on Keras."""
    on_litert, on_keras = Bundle.load(None), Bundle.load(None, runtime="keras")
    assert on_litert.runtime is not None and on_keras.runtime is None
    return on_litert, on_keras


def _without_copies(bundle: Bundle) -> Bundle:
    metadata = {k: v for k, v in bundle.metadata.items() if k != "test_time"}
    if bundle.runtime is None:
        return Bundle(bundle.folder, bundle.model, metadata)
    return Bundle(bundle.folder, None, metadata, litert.Runtime(bundle.folder, metadata["export"]["litert"]))


def _corpus(name: str, tmp_path: Path) -> list:
    folder = SAMPLES if name == "samples" else write_awkward(tmp_path / "corpus")
    return expand_paths([folder])


@pytest.mark.parametrize("copies", ["shipped", "none"])
@pytest.mark.parametrize("corpus", ["samples", "awkward"])
def test_litert_and_keras_give_the_same_records(engines, corpus, copies, tmp_path):
    on_litert, on_keras = engines if copies == "shipped" else map(_without_copies, engines)
    assert ("test_time" in on_litert.metadata) == (copies == "shipped")
    items = _corpus(corpus, tmp_path)
    ours = list(iter_predictions(on_litert, items, batch_size=5))
    theirs = list(iter_predictions(on_keras, items, batch_size=5))
    assert len(ours) == len(theirs) == len(items) and sum("error" not in r for r in ours) >= 9
    for mine, keras_record in zip(ours, theirs, strict=True):
        assert list(mine) == list(keras_record)  # the same JSON keys, in the same order
        for key in mine.keys() - {"probability", "ood_score"}:
            assert mine[key] == keras_record[key], (mine["path"], key)
        for key in mine.keys() & {"probability", "ood_score"}:
            assert mine[key] == pytest.approx(keras_record[key], abs=1e-4), (mine["path"], key)
    # The raw outputs and the feature layer themselves, on the decoded films.
    x = np.stack([decode_to_input(p, on_keras.image_size) for p in SAMPLE_PATHS])
    layer = on_keras.decision.feature_layer
    raw, features = on_litert.forward_features(x, 7, layer)
    keras_raw, keras_features = on_keras.forward_features(x, 7, layer)
    np.testing.assert_allclose(raw, keras_raw, rtol=0, atol=RAW_TOLERANCE)
    np.testing.assert_allclose(features, keras_features, rtol=0, atol=1e-4 * np.abs(keras_features).max())


def test_the_class_activation_map_is_the_flatbuffers_cam_output(engines):
    on_litert, on_keras = engines
    for path in SAMPLE_PATHS[::4]:
        x = decode_to_input(path, on_keras.image_size)
        grid, method = class_activation_map(on_litert, x)
        keras_grid, keras_method = class_activation_map(on_keras, x)
        assert method == keras_method == "cam" and grid.shape == keras_grid.shape
        np.testing.assert_allclose(grid, keras_grid, rtol=0, atol=1e-4 * np.abs(keras_grid).max())


@pytest.mark.parametrize(
    ("engine", "copies", "way"),
    [("litert", "shipped", "lanes"), ("litert", "none", "batches"), ("keras", "shipped", "batches")],
)
def test_predict_runs_lanes_for_the_flatbuffer_with_copies(engines, engine, copies, way, monkeypatch):
    """`predict.verdicts` picks `stream.lanes` where it measured faster (the flatbuffer with the
    test-time copies), else the decode-ahead `stream.batches`; the records are the same."""
    bundle = engines[0] if engine == "litert" else engines[1]
    bundle = bundle if copies == "shipped" else _without_copies(bundle)
    used = []
    for name in ("lanes", "batches"):
        original = getattr(stream, name)
        monkeypatch.setattr(
            stream, name, lambda *a, _f=original, _n=name, **k: used.append(_n) or _f(*a, **k)
        )
    paths = sorted(SAMPLES.rglob("*.jpeg"))[:3]
    found = [verdict.record() for *_, verdict in verdicts(bundle, paths)]
    assert used == [way] and len(found) == 3


def test_each_thread_runs_its_own_interpreter(engines):
    """The loading thread's interpreter uses every core; each other thread (a lane of
    `stream.lanes`) gets its own on one thread, and all give the same numbers."""
    runtime = engines[0].runtime
    size = engines[0].image_size
    x = np.random.default_rng(3).uniform(0, 255, (5, size, size, 1)).astype(np.float32)
    main = runtime(x, 4, "stage3_out")
    assert runtime.local.threads == runtime.threads == (os.cpu_count() or 1)

    def lane(_):
        return runtime.runner, runtime.local.threads, runtime(x, 4, "stage3_out")

    with ThreadPoolExecutor(2) as pool:
        lanes = list(pool.map(lane, range(2)))
    assert runtime.runner is not lanes[0][0] and lanes[0][0] is not lanes[1][0]
    for _, threads, (raw, features) in lanes:
        assert threads == 1
        np.testing.assert_array_equal(raw, main[0])
        np.testing.assert_array_equal(features, main[1])


@pytest.mark.parametrize(("count", "batch_size"), [(1, 32), (5, 2), (7, 7), (6, 4)])
def test_the_copies_are_shifted_in_numpy_as_keras_shifts_them(count, batch_size, tmp_path):
    """A model that reads the top-left corner sees each copy differently: the flatbuffer's mean
    over the NumPy copies is the mean over perturb.translate's (conftest.raw_with_copies)."""
    plain = window_reader(slice(0, 10), slice(0, 10))
    block = litert.write(plain.model, tmp_path / litert.FILE_NAME, {})
    test_time = {"shifts": [[0, 0], [-3, -3], [3, 3], [2, -5]], "fill": 0, "combine": TEST_TIME_COMBINE}
    runtime = litert.Runtime(tmp_path, block, test_time)
    rng = np.random.default_rng(count)
    films = np.stack(
        [np.roll(CHECKER, tuple(int(v) for v in rng.integers(0, S, 2)), (0, 1)) for _ in range(count)]
    )
    expected = raw_with_copies(plain.model, films.astype(np.float32), {"test_time": test_time})
    raw, _ = runtime(films, batch_size)
    assert raw.shape == (count,) and raw.dtype == np.float32
    np.testing.assert_allclose(raw, expected, rtol=0, atol=RAW_TOLERANCE)


def test_predict_imports_no_tensorflow(tmp_path):
    """`pneumoscan predict` on the samples with the bundled model (which has its flatbuffer),
    and `explain` (its class activation map), never import TensorFlow or Keras; the
    interpreters' start-up line stays off the screen and a bad file's sentence reaches it (the
    lanes' interpreters leave the process's stderr alone)."""
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not an image")
    code = (
        "import sys\n"
        "from pneumoscan.cli import main\n"
        f"out = {str(tmp_path / 'out.jsonl')!r}\n"
        f"code = main(['predict', '--output', out, {str(SAMPLES)!r}, {str(bad)!r}])\n"
        f"maps = {str(tmp_path / 'maps')!r}\n"
        f"code = 10 * code + main(['explain', '--out', maps, {str(SAMPLE_PATHS[0])!r}])\n"
        "print(code, sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.stdout.strip().splitlines()[-1] == "10 []", result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == len(SAMPLE_PATHS) + 1 and all("label" in r for r in records[:-1])
    assert len(list((tmp_path / "maps").glob("*.png"))) == 1
    assert "XNNPACK" not in result.stderr  # the interpreter's start-up line stays off the user's screen
    assert f"{bad}: is not a JPEG, PNG or DICOM image." in result.stderr


@pytest.fixture
def copy_of_bundled(tmp_path) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(bundled_dir(), folder)
    return folder


@pytest.mark.parametrize("made", ["file removed", "made before the flatbuffer"])
def test_a_bundle_without_the_flatbuffer_predicts_through_keras(copy_of_bundled, made, capsys, engines):
    (copy_of_bundled / litert.FILE_NAME).unlink()
    if made == "made before the flatbuffer":
        meta = read(copy_of_bundled)
        del meta["export"]["litert"]
        write(copy_of_bundled, meta)
    bundle = Bundle.load(copy_of_bundled)
    assert bundle.runtime is None
    assert main(["predict", "--model", str(copy_of_bundled), "--format", "json", str(SAMPLES)]) == 0
    records = json.loads(capsys.readouterr().out)
    expected = list(iter_predictions(engines[0], expand_paths([SAMPLES])))
    assert [r["label"] for r in records] == [r["label"] for r in expected]
    with pytest.raises(Exception, match="cannot run on LiteRT"):
        Bundle.load(copy_of_bundled, runtime="litert")


def test_a_tampered_flatbuffer_is_refused_in_one_sentence(copy_of_bundled, capsys):
    path = copy_of_bundled / litert.FILE_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight's byte
    path.write_bytes(bytes(data))
    assert main(["predict", "--model", str(copy_of_bundled), "--format", "json", str(SAMPLES)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("pneumoscan: error: ") and str(path) in err, err
    assert "SHA-256" in err and err.count(".") >= 1 and "\n" not in err and "Traceback" not in err
    assert captured.out == ""


def test_evaluate_and_threshold_run_on_litert_without_tensorflow(trained_run, tmp_path, capsys):
    """An exported bundle: `evaluate` and `threshold` run on its flatbuffer in a process that never
    imports TensorFlow, and evaluate's figures are those of the same bundle on Keras."""
    root, run_dir = trained_run
    bundle = tmp_path / "bundle"
    assert main(["export", "--model", str(run_dir), "--out", str(bundle)]) == 0
    keras_only = shutil.copytree(bundle, tmp_path / "keras", ignore=shutil.ignore_patterns("*.tflite"))
    code = (
        "import json, sys\n"
        "from pneumoscan.cli import main\n"
        f"model, data = {str(bundle)!r}, {str(root)!r}\n"
        "codes = [main(['evaluate', '--model', model, '--data', data, '--split', 'val', '--json']),\n"
        "         main(['threshold', '--model', model, '--data', data, '--rule', 'youden'])]\n"
        "print(json.dumps([codes, sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    lines = result.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == [[0, 0], []], result.stderr[-2000:]
    ours = json.loads(lines[0])
    capsys.readouterr()
    command = ["evaluate", "--model", str(keras_only), "--data", str(root), "--split", "val", "--json"]
    assert main(command) == 0
    theirs = json.loads(capsys.readouterr().out)
    assert list(ours) == list(theirs) and ours["confusion_matrix"] == theirs["confusion_matrix"]
    for key in ("roc_auc", "brier", "sensitivity", "specificity"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key
    assert read(bundle)["threshold"]["rule"] == "youden"  # threshold wrote its choice
