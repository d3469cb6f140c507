"""Shared fixtures and helpers: synthetic X-ray-like images in tmp_path, the committed real
samples, and running a TF.js export in Node (tests/js/predict.mjs) beside Keras."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
from PIL import Image

from pneumoscan.bundle import Bundle

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "chest_xray"
SHARED_DATA = REPO.parent / "shared" / "data" / "chest_xray"

PREDICT_JS = REPO / "tests" / "js" / "predict.mjs"
NODE = shutil.which("node")
HAVE_TFJS = all(
    (REPO / "node_modules" / package / "package.json").is_file()
    for package in ("@tensorflow/tfjs", "dicom-parser")
)
# `make test` installs Node's packages and Chromium, then sets this: there, a test that needs
# them and finds them missing fails with one sentence instead of being skipped.
REQUIRE_BROWSER = "PNEUMOSCAN_REQUIRE_BROWSER"


def load_benchmark(name: str):
    """The module of benchmarks/TOPIC/NAME.py, given as "TOPIC/NAME" (e.g. "trust/nonxray").

    The benchmarks are a package run from the repository root (`python -m benchmarks.TOPIC.NAME`);
    pytest puts that root on the import path (pyproject.toml's `pythonpath`).
    """
    import importlib

    if not (REPO / "benchmarks" / f"{name}.py").is_file():
        raise FileNotFoundError(f"benchmarks/{name}.py: no such benchmark (give it as TOPIC/NAME)")
    return importlib.import_module("benchmarks." + name.replace("/", "."))


def require_or_skip(missing: str | None) -> None:
    """Nothing when `missing` is None; else skip, or fail when $PNEUMOSCAN_REQUIRE_BROWSER is 1."""
    if missing is None:
        return
    if os.environ.get(REQUIRE_BROWSER) == "1":
        pytest.fail(
            f"{missing}; {REQUIRE_BROWSER}=1 (make test) makes this a failure, not a skip.", pytrace=False
        )
    pytest.skip(missing)


@pytest.fixture(scope="session")
def node_and_tfjs() -> None:
    """Session-scoped, so that it runs before any module fixture that would start Node."""
    require_or_skip(
        None
        if NODE is not None and HAVE_TFJS
        else "needs `node` and node_modules/@tensorflow/tfjs and dicom-parser (run `npm ci` in the repo root)"
    )


needs_node = pytest.mark.usefixtures("node_and_tfjs")
NODE_TIMEOUT_S = 120
# Between TF.js and Keras running the same (dequantized) weights: only float32 rounding.
DECODE_TOLERANCE = 1e-5


def keras_predict(model, images: np.ndarray) -> np.ndarray:
    """The model's outputs in inference mode, float64."""
    import keras

    return keras.ops.convert_to_numpy(model(images, training=False)).astype(np.float64)


def raw_with_copies(model, images: np.ndarray, metadata: dict) -> np.ndarray:
    """The raw outputs metadata.json says a model gives, computed apart from Bundle.forward:
    the model on each test-time copy (perturb.translate), averaged; float64 (n,)."""
    from pneumoscan.perturb import translate

    shifts = metadata["test_time"]["shifts"] if "test_time" in metadata else [[0, 0]]
    outputs = [keras_predict(model, np.stack([translate(x, dy, dx) for x in images])) for dy, dx in shifts]
    return np.mean(outputs, axis=0).reshape(-1)


def tfjs_predict(model_dir: Path, images: np.ndarray, workdir: Path) -> np.ndarray:
    """Outputs of the TF.js layers model in `model_dir` on the cpu backend of @tensorflow/tfjs in
    Node, float64; the input is written to `workdir`."""
    input_path = Path(workdir) / "input.f32"
    images.astype("<f4").tofile(input_path)
    command = [NODE, str(PREDICT_JS), str(model_dir), str(input_path), *map(str, images.shape)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=NODE_TIMEOUT_S, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reply = json.loads(result.stdout)
    assert reply["backend"] == "cpu"
    return np.asarray(reply["outputs"], dtype=np.float64)


UNITS_JS = REPO / "tests" / "js" / "units.mjs"


class NodeLines:
    """One Node process answering one JSON line with one JSON line: `exchange(request, what)`
    sends a request and returns the answer, failing the test if none comes in `timeout` s."""

    def __init__(self, argv: list[str], timeout: float = NODE_TIMEOUT_S):
        self.script, self.timeout = Path(argv[0]).name, timeout
        self.process = subprocess.Popen(
            [NODE, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )

    def exchange(self, request: dict, what) -> dict:
        import select

        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.process.kill()
            pytest.fail(f"{self.script} gave no answer for {what}: {self.process.stderr.read()[-3000:]}")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=self.timeout)


class PageUnits(NodeLines):
    """One Node process running single functions of the page's modules (tests/js/units.mjs):
    `call(name, **arguments)` sends one JSON line and returns the answer's."""

    def __init__(self):
        super().__init__([str(UNITS_JS)])

    def call(self, name: str, **arguments) -> dict:
        return self.exchange({"call": name, **arguments}, name)


@pytest.fixture(scope="module")
def page_units(node_and_tfjs):
    units = PageUnits()
    yield units
    units.close()


def synthetic_xray(seed: int, label: int, size: tuple[int, int] = (72, 64)) -> np.ndarray:
    """A uint8 grayscale image whose brightness pattern depends on the label (learnable)."""
    rng = np.random.default_rng(seed)
    height, width = size[1], size[0]
    yy, xx = np.mgrid[0:height, 0:width]
    base = 60 + 40 * np.sin(xx / 7.0) + rng.normal(0, 12, (height, width))
    if label:  # "opacity": a bright blob in one lung field
        cy, cx = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4)
        base += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (width / 6) ** 2))
    return np.clip(base, 0, 255).astype(np.uint8)


def write_class_folders(
    root: Path, patients: dict[str, int], images_per_patient: int = 2, fmt: str = "png", seed: int = 0
) -> Path:
    """root/{NORMAL,PNEUMONIA}/<patient>-<k>.<fmt> for `patients` {id: label}.

    Images depend on `seed` and each patient's rank: two calls with the same seed write
    byte-identical images for patients of the same rank, so give each folder of one dataset its own.
    """
    for i, (patient, label) in enumerate(sorted(patients.items())):
        folder = root / ("PNEUMONIA" if label else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(images_per_patient):
            name = (
                f"{patient}_{'bacteria' if label else ''}{k}.{fmt}"
                if patient.startswith("person")
                else f"{patient}-000{k + 1}.{fmt}"
            )
            Image.fromarray(synthetic_xray(seed + 1000 * i + k, label)).save(folder / name)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """A single split folder: 12 NORMAL and 12 PNEUMONIA patients, 2 images each."""
    patients = {f"IM-{100 + i:04d}": 0 for i in range(12)}
    patients.update({f"person{i + 1}": 1 for i in range(12)})
    return write_class_folders(tmp_path / "xray", patients)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset root with train/ only, run folder) for a 2-epoch seed model at 64x64."""
    from pneumoscan.config import Config
    from pneumoscan.train import train

    root = tmp_path_factory.mktemp("dataset")
    patients = {f"IM-{100 + i:04d}": 0 for i in range(15)}
    patients.update({f"person{i + 1}": 1 for i in range(15)})
    write_class_folders(root / "train", patients)
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    train(Config(arch="seed", image_size=64, epochs=2, batch_size=8, random_seed=1), root, run_dir)
    return root, run_dir


# ---- an awkward-input corpus, for predict, evaluate, training data and (tests/test_web.py) the page


def _save(path: Path, image: Image.Image, **options) -> None:
    image.save(path, **options)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG signature and IHDR claiming width x height, then IEND: a decompression bomb's header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


_GRAY = synthetic_xray(3, 1, size=(120, 100))
_RGB = np.dstack([_GRAY, _GRAY // 2, 255 - _GRAY])
_SAMPLE_JPEG = SAMPLES / "NORMAL" / "IM-0115-0001.jpeg"
# Files that are images and must be predicted (name -> writer).
AWKWARD_VALID = {
    "gray16.png": lambda p: _save(p, Image.fromarray(_GRAY.astype(np.uint16) * 257)),
    "rgba.png": lambda p: _save(p, Image.fromarray(np.dstack([_RGB, np.full(_GRAY.shape, 90, np.uint8)]))),
    "palette.png": lambda p: _save(p, Image.fromarray(_RGB).quantize(32)),
    "cmyk.jpeg": lambda p: _save(p, Image.fromarray(_RGB).convert("CMYK"), format="JPEG"),
    "upper.JPG": lambda p: _save(p, Image.fromarray(_GRAY), format="JPEG"),
    os.fsdecode(b"caf\xe9-latin1-name.jpeg"): lambda p: p.write_bytes(_SAMPLE_JPEG.read_bytes()),
    **{
        f"exif-orientation-{k}.jpeg": (
            lambda p, k=k: _save(p, Image.fromarray(_GRAY), format="JPEG", exif=_exif(k))
        )
        for k in range(1, 9)
    },
}
# Files that are not usable images (name -> (writer, the sentence's telling part)).
AWKWARD_BAD = {
    "empty.jpeg": (lambda p: p.write_bytes(b""), "the file is empty"),
    os.fsdecode(b"d\xe9fect-latin1-name.png"): (lambda p: p.write_bytes(b""), "the file is empty"),
    "notes.png": (lambda p: p.write_text("hello"), "is not a JPEG, PNG or DICOM image"),
    "text-named.jpeg": (
        lambda p: p.write_text("This is a text file.\n"),
        "is not a JPEG, PNG or DICOM image",
    ),
    "random-bytes.png": (
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
        "is not a JPEG, PNG or DICOM",
    ),
    "truncated.jpeg": (lambda p: p.write_bytes(_SAMPLE_JPEG.read_bytes()[:700]), "truncated or corrupt"),
    "bomb.png": (lambda p: _save(p, Image.new("L", (9000, 6000))), "over the 50 MP limit"),
    "bomb-header.png": (lambda p: _png_header_only(p, 100_000, 100_000), "over the 50 MP"),
    "icon.png": (lambda p: _save(p, Image.new("L", (20, 20))), "too small to be a chest X-ray"),
    "one-pixel.png": (lambda p: _save(p, Image.new("L", (1, 1))), "too small to be a chest X-ray"),
    "anim.gif": (lambda p: _save(p, Image.fromarray(_GRAY), format="GIF"), "only JPEG and PNG"),
}


def write_awkward(folder: Path) -> Path:
    """Every AWKWARD_VALID and AWKWARD_BAD file in `folder`, plus a symbolic link back to the
    folder (a loop that listing must not follow)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in AWKWARD_VALID.items():
        make(folder / name)
    for name, (make, _) in AWKWARD_BAD.items():
        make(folder / name)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    return folder


# ---- hand-built models for explain and robustness: inputs of S x S --------------------------

S = 64  # regions at 64: corner squares 10 px, border band 6 px, centre rows 10-53, cols 13-50
NO_CALIBRATION = {"method": "none", "slope": 1.0, "intercept": 0.0}
YY, XX = np.mgrid[0:S, 0:S]
# 8 x 8 checkerboard of bright (220) and dark (20) cells, bright at the top-left and
# bottom-right corners: every region holds bright and dark pixels alike, so only the model's
# weights decide where occluding (with the mean, 120) lowers the output.
CHECKER = np.where((YY // 8 + XX // 8) % 2 == 0, 220.0, 20.0).astype(np.float32)[..., None]
FLAT = np.full((S, S, 1), 100.0, np.float32)


def window_reader(rows: slice, cols: slice, scale: float = 8.0, bias: float = -4.0) -> Bundle:
    """sigmoid(scale * mean(x[rows, cols] / 255) + bias): a model that sees only that window."""
    import keras

    inputs = keras.Input((S, S, 1))
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="read")(x))
    weights = np.zeros((S, S), np.float32)
    weights[rows, cols] = 1.0
    model.get_layer("read").set_weights(
        [(weights * scale / weights.sum()).reshape(-1, 1), np.array([bias], np.float32)]
    )
    return hand_built(model)


def hand_built(model) -> Bundle:
    """A Bundle around a Keras model of S x S inputs, uncalibrated."""
    return Bundle(Path("hand-built"), model, {"input": {"height": S}, "calibration": NO_CALIBRATION})


# ---- DICOM files made from the sample X-rays (pydicom) ----------------------------------


def write_dicom(
    path: Path,
    gray: np.ndarray,
    bits: int = 8,
    photometric: str = "MONOCHROME2",
    window: bool = False,
    syntax: str = "explicit-little",
    **header,
) -> Path:
    """`gray` (H, W) uint8 as a DICOM file that windows back to `gray`: stored with `bits`
    (scaled to that depth; with `window`, to a part of it that a VOI window maps back to 0..255),
    inverted for MONOCHROME1, in `syntax` (explicit-little, explicit-big, rle, jpeg-baseline,
    deflated), plus any header attributes."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        RLELossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    values = gray.astype(np.float64) / 255.0
    if photometric == "MONOCHROME1":
        values = 1.0 - values
    top = 2**bits - 1
    low, high = (top * 0.25, top * 0.75) if window else (0, top)  # the window: the middle half
    stored = np.rint(low + values * (high - low)).astype(np.uint8 if bits <= 8 else np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "DX", "Doe^Jane", "SECRET-ID-123"
    ds.Rows, ds.Columns = gray.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        (8 if bits <= 8 else 16),
        bits,
        bits - 1,
        0,
    )
    if window:  # LINEAR: [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] -> 0..255
        ds.WindowWidth = high - low + 1
        ds.WindowCenter = low + 0.5 + (high - low) / 2
    for key, value in header.items():
        setattr(ds, key, value)
    ds.PixelData = stored.tobytes()
    if syntax == "rle":
        ds.compress(RLELossless)
    elif syntax == "jpeg-baseline":
        buffer = io.BytesIO()
        Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].is_undefined_length = True
    elif syntax == "deflated":
        meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    if syntax == "explicit-big":
        meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
        pydicom.dcmwrite(path, ds, little_endian=False, implicit_vr=False)
    else:
        ds.save_as(path, enforce_file_format=True)
    return path
