"""The page's preprocessing (web/preprocess.js, run in Node) against pneumoscan.preprocess, on
images that hypothesis generates: every PNG colour type at 1 to 16 bits, interlaced or not,
every EXIF orientation (with XMP and text-chunk decoys that both sides must ignore), odd and
even sizes from the 32 px minimum to a few hundred; and JPEGs (grey, RGB, CMYK).

PNGs are compared exactly: the same orientation and size, the same luma byte for byte, and the
model input (after each side's bilinear resize) within INPUT_TOLERANCE. Node has no JPEG
decoder, so for JPEGs the page's decoder is given the pixels Pillow decodes; what is compared
is everything the page does around it (the orientation rule, the APP1 segments it strips
before decoding, luma, resize), and Pillow must decode the stripped bytes to the same pixels.
Chromium's own JPEG decoding is compared in tests/test_web.py.

One Node process (tests/js/preprocess.mjs) answers every example of the module.
"""

from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import image_files
from conftest import REPO, NodeLines, needs_node, write_dicom
from pneumoscan.bundle import bundled_dir
from pneumoscan.calibrate import apply_calibration
from pneumoscan.preprocess import (
    MIN_SIDE,
    ORIENTATION_SOURCES,
    PREPROCESSING_STEPS,
    ImageError,
    load_grayscale,
    resize,
)

pytestmark = [needs_node, pytest.mark.slow]

PREPROCESS_JS = REPO / "tests" / "js" / "preprocess.mjs"
SIZE = 160  # the bundled model's input
# On the model's [0, 1] scale (its first layer divides by 255). TensorFlow computes the bilinear
# source coordinates in float32, TF.js in float64: between two pixels 100 levels apart that moves
# the output by up to ~2e-3 levels (1.8e-3 measured over 150 random sizes, i.e. 7e-6 here). A
# resize that differs in kind (corners, centres, antialias) is off by whole levels.
INPUT_TOLERANCE = 1e-4
ANSWER_TIMEOUT_S = 60
EXAMPLES = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

# (colour type, bit depth): grey (L, 1/2/4-bit, I;16), grey + alpha (LA), RGB, RGBA, palette (P).
PNG_TYPES = [(0, 8), (0, 16), (0, 1), (0, 2), (0, 4), (4, 8), (4, 16), (2, 8), (2, 16), (6, 8), (6, 16)]
PNG_TYPES += [(3, 1), (3, 2), (3, 4), (3, 8)]
sides = st.integers(MIN_SIDE, 300)
orientations = st.sampled_from([None, *range(1, 9)])  # None: no EXIF at all


class Page(NodeLines):
    """The Node process running web/preprocess.js; `ask` sends one file, returns its answer."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0
        (folder / "metadata.json").write_text(json.dumps(_metadata()))
        super().__init__([str(PREPROCESS_JS), str(folder / "metadata.json")], ANSWER_TIMEOUT_S)

    def write(self, name: str, data: bytes) -> Path:
        self.count += 1
        path = self.folder / str(self.count) / name
        path.parent.mkdir()
        path.write_bytes(data)
        return path

    def check_metadata(self, metadata: dict) -> dict:
        """The page's `readPlan` on `metadata`: {"plan"} or {"error"}."""
        return self.exchange({"metadata": metadata}, "metadata")

    def ask(self, path: Path, pixels: np.ndarray | None = None) -> dict:
        request = {"path": str(path)}
        if pixels is not None:  # (height, width, 4) uint8, the stand-in JPEG decoder's answer
            raw = path.with_suffix(".rgba")
            raw.write_bytes(np.ascontiguousarray(pixels, np.uint8).tobytes())
            request.update(pixels=str(raw), width=pixels.shape[1], height=pixels.shape[0])
        return self.exchange(request, path)


def _metadata(**decode) -> dict:
    """The bundled model's metadata.json with the contract as this checkout writes it (SIZE x
    SIZE input), its decode step updated with `decode`."""
    metadata = json.loads((bundled_dir() / "metadata.json").read_text())
    metadata["preprocessing"] = copy.deepcopy(PREPROCESSING_STEPS)
    metadata["preprocessing"][0].update(decode)
    metadata["preprocessing"][3]["size"] = [SIZE, SIZE]
    metadata["input"].update(height=SIZE, width=SIZE)
    return metadata


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    page = Page(tmp_path_factory.mktemp("preprocess-js"))
    yield page
    page.close()


def _picture(seed: int, height: int, width: int, channels: int, levels: int) -> np.ndarray:
    """(height, width, channels) integer samples in [0, levels): smooth shapes and noise, so that
    resizing has edges and gradients to get wrong."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    planes = []
    for _ in range(channels):
        fx, fy, phase = rng.uniform(1, 12, 3)
        plane = 0.5 + 0.35 * np.sin(fx * xx + phase) * np.cos(fy * yy) + rng.normal(0, 0.08, (height, width))
        planes.append(plane)
    return np.clip(np.rint(np.stack(planes, -1) * (levels - 1)), 0, levels - 1).astype(np.int64)


@st.composite
def png_files(draw) -> tuple[str, bytes]:
    colour_type, depth = draw(st.sampled_from(PNG_TYPES))
    height, width, seed = draw(sides), draw(sides), draw(st.integers(0, 2**32 - 1))
    orientation, decoy = draw(orientations), draw(st.sampled_from([None, "raw-profile", "xmp"]))
    channels = image_files.CHANNELS[colour_type]
    samples = _picture(seed, height, width, channels, 1 << depth)
    palette = None
    if colour_type == 3:
        palette = np.random.default_rng(seed).integers(0, 256, (1 << depth, 3))
    before = []
    if decoy:  # an orientation the rule ignores, different from the EXIF one
        decoy_chunk = image_files.raw_profile_chunk if decoy == "raw-profile" else image_files.xmp_chunk
        before.append(decoy_chunk(((orientation or 1) % 8) + 1))
    if orientation is not None:
        before.append(image_files.exif_chunk(orientation))
    data = image_files.png(
        samples,
        colour_type,
        depth,
        palette=palette,
        interlace=draw(st.booleans()),
        before_idat=tuple(before),
        first_filter=draw(st.integers(0, 4)),
    )
    return f"c{colour_type}-{depth}bit-{width}x{height}-o{orientation}-{decoy}.png", data


@st.composite
def jpeg_files(draw) -> tuple[str, bytes]:
    mode = draw(st.sampled_from(["L", "RGB", "CMYK"]))
    height, width, seed = draw(sides), draw(sides), draw(st.integers(0, 2**32 - 1))
    orientation, xmp = draw(orientations), draw(st.sampled_from([None, *range(1, 9)]))
    samples = _picture(seed, height, width, 1 if mode == "L" else 3, 256).astype(np.uint8)
    image = Image.fromarray(samples[..., 0] if mode == "L" else samples)
    data = image_files.jpeg(image.convert(mode), orientation, xmp, quality=draw(st.integers(60, 98)))
    return f"{mode}-{width}x{height}-o{orientation}-xmp{xmp}.jpeg", data


def _python(name: str, data: bytes) -> dict:
    """What pneumoscan.preprocess makes of the file: luma and model input, or the refusal."""
    try:
        gray = load_grayscale(name, data)
    except ImageError as error:
        return {"error": str(error)}
    return {"luma": gray, "input": resize(gray, SIZE)[..., 0]}


def _check(answer: dict, expected: dict) -> None:
    if "error" in expected:
        assert answer.get("error") == expected["error"], answer
        return
    assert "error" not in answer, answer["error"]
    luma = np.frombuffer(base64.b64decode(answer["luma"]), np.uint8)
    assert (answer["height"], answer["width"]) == expected["luma"].shape  # orientation and size
    np.testing.assert_array_equal(luma.reshape(expected["luma"].shape), expected["luma"])
    model_input = np.frombuffer(base64.b64decode(answer["input"]), "<f4").reshape(SIZE, SIZE)
    np.testing.assert_allclose(model_input / 255, expected["input"] / 255, rtol=0, atol=INPUT_TOLERANCE)


@EXAMPLES
@given(png_files())
def test_png_python_and_page_agree(page, png_file):
    name, data = png_file
    _check(page.ask(page.write(name, data)), _python(name, data))


@EXAMPLES
@given(jpeg_files())
def test_jpeg_python_and_page_agree_around_the_decoder(page, jpeg_file):
    name, data = jpeg_file
    with Image.open(io.BytesIO(data)) as image:  # as stored, before any orientation
        stored = np.asarray(image.convert("RGB" if image.mode != "L" else "L").convert("RGBA"))
    answer = page.ask(page.write(name, data), stored)
    _check(answer, _python(name, data))
    handed = base64.b64decode(answer["jpeg"])
    assert b"Exif\x00\x00" not in handed and image_files.XMP_NAMESPACE not in handed
    with Image.open(io.BytesIO(handed)) as image:
        np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data))))


# ---- the contract: what the page accepts in metadata.json -------------------------------------

ORIENTATION_CONTRACTS = [
    ("the bundled model's, written before the key", None, True),
    ("as Python writes it", ORIENTATION_SOURCES, True),
    ("in another order", ORIENTATION_SOURCES[::-1], True),
    ("XMP too", [*ORIENTATION_SOURCES, "xmp"], False),
    ("PNG text chunks too", [*ORIENTATION_SOURCES, "png-raw-profile-text"], False),
    ("eXIf only", ["png-exif"], False),
    ("not a list", "png-exif", False),
]


@pytest.mark.parametrize(
    "sources, accepted", [c[1:] for c in ORIENTATION_CONTRACTS], ids=[c[0] for c in ORIENTATION_CONTRACTS]
)
def test_page_follows_only_the_orientation_rule_it_implements(page, sources, accepted):
    metadata = _metadata() if sources is None else _metadata(orientation_sources=sources)
    if sources is None:
        del metadata["preprocessing"][0]["orientation_sources"]
    answer = page.check_metadata(metadata)
    if accepted:
        assert "plan" in answer, answer
    else:
        assert answer.get("error", "").startswith("metadata.json: decode.orientation_sources must be"), answer


@pytest.mark.parametrize(
    "slope, intercept",
    [(1.5, 0.0), (2, 0), (1, 0.25), (1.0, -1e-05), (1e16, 0), (0.1 + 0.2, 1e-7), (-0.0, 0), (1, 0)],
)
def test_page_refuses_calibration_none_as_python_does(page, slope, intercept):
    calibration = {"method": "none", "slope": slope, "intercept": intercept, "fitted_on": None}
    answer = page.check_metadata({**_metadata(), "calibration": calibration})
    try:
        apply_calibration(0.5, calibration)
    except ValueError as error:
        assert answer.get("error") == f"metadata.json: {error}", answer
    else:
        assert "plan" in answer, answer


# ---- DICOM: the decode step's `dicom` contract ------------------------------------------------

DICOM_SOURCE = load_grayscale(REPO / "samples" / "chest_xray" / "PNEUMONIA" / "person19_bacteria_61.jpeg")


def _voi_lut(bits: int, entries: int, first: int):
    """A VOI LUT sequence of one item: `entries` values from `first` on, a gamma-like curve."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    curve = np.rint((np.linspace(0, 1, entries) ** 0.7) * (2**bits - 1))
    item.LUTDescriptor = [entries, first, bits]
    item.LUTData = curve.astype("<u2" if bits > 8 else np.uint8).tobytes()
    return Sequence([item])


def _recode(path: Path, syntax: str | None = None, raw: bool = False, **changes) -> Path:
    """Rewrite a DICOM file: header `changes`, another little-endian `syntax`, or (`raw`) the bare
    data set, without preamble and file meta group."""
    import pydicom

    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    if raw:
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
        return path
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def _colour(path: Path, planar: int, bits: int = 8) -> Path:
    from test_dicom import colour_dicom

    return colour_dicom(path, DICOM_SOURCE, planar, bits)


# name -> writer of a DICOM file that Python reads: the page must give the same luma, byte for byte
DICOM_CASES = {
    "monochrome2 8 bit.dcm": lambda p: write_dicom(p, DICOM_SOURCE),
    "monochrome1 12 bit.dcm": lambda p: write_dicom(p, DICOM_SOURCE, bits=12, photometric="MONOCHROME1"),
    "16 bit VOI window.dcm": lambda p: write_dicom(p, DICOM_SOURCE, bits=16, window=True),
    "RLE 16 bit MONOCHROME1.dcm": lambda p: write_dicom(
        p, DICOM_SOURCE, bits=16, syntax="rle", photometric="MONOCHROME1"
    ),
    "big endian 12 bit.dcm": lambda p: write_dicom(p, DICOM_SOURCE, bits=12, syntax="explicit-big"),
    "no extension": lambda p: write_dicom(p, DICOM_SOURCE),
    "implicit VR.dcm": lambda p: _recode(write_dicom(p, DICOM_SOURCE, bits=12), "1.2.840.10008.1.2"),
    "signed, rescaled, LINEAR_EXACT.dcm": lambda p: write_dicom(
        p,
        DICOM_SOURCE,
        bits=12,
        PixelRepresentation=1,  # the same stored bits read as two's complement: negative values too
        RescaleSlope=2,
        RescaleIntercept=-1024,
        WindowCenter=-300,
        WindowWidth=3001,
        VOILUTFunction="LINEAR_EXACT",
    ),
    "SIGMOID window.dcm": lambda p: write_dicom(
        p, DICOM_SOURCE, bits=16, WindowCenter=30000.5, WindowWidth=40000, VOILUTFunction="SIGMOID"
    ),
    "window of width 1.dcm": lambda p: write_dicom(p, DICOM_SOURCE, WindowCenter=100, WindowWidth=1),
    "signed, no window: the stored range.dcm": lambda p: write_dicom(
        p, DICOM_SOURCE, bits=16, PixelRepresentation=1, RescaleSlope=0.5, RescaleIntercept=10
    ),
    "8-bit VOI LUT.dcm": lambda p: write_dicom(
        p, DICOM_SOURCE, bits=12, VOILUTSequence=_voi_lut(8, 256, 1000)
    ),
    "16-bit VOI LUT over a window.dcm": lambda p: write_dicom(
        p, DICOM_SOURCE, bits=16, window=True, VOILUTSequence=_voi_lut(16, 4096, 20000)
    ),
    "RGB.dcm": lambda p: _colour(p, planar=0),
    "RGB planar.dcm": lambda p: _colour(p, planar=1),
    "RGB 12 bit.dcm": lambda p: _colour(p, planar=0, bits=12),
    "lateral knee.dcm": lambda p: write_dicom(p, DICOM_SOURCE, ViewPosition="LAT", BodyPartExamined="KNEE"),
}


def _jpeg_frame_pixels(path: Path) -> np.ndarray:
    """The frame of a JPEG baseline DICOM file as Pillow decodes it, RGBA: the stand-in for the
    browser's decoder."""
    import pydicom
    from pydicom.encaps import generate_frames

    frame = next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))
    with Image.open(io.BytesIO(frame)) as image:
        return np.asarray(image.convert("RGBA"))


@pytest.mark.parametrize("name", [*DICOM_CASES, "JPEG baseline MONOCHROME1.dcm"])
def test_dicom_python_and_page_agree(page, name):
    """Each way of storing and windowing the pixels, and the header's warnings."""
    path = page.write(name, b"")
    if name in DICOM_CASES:
        DICOM_CASES[name](path)
        answer = page.ask(path)
    else:
        write_dicom(path, DICOM_SOURCE, photometric="MONOCHROME1", syntax="jpeg-baseline")
        answer = page.ask(path, _jpeg_frame_pixels(path))
    expected = _python(name, path.read_bytes())
    _check(answer, expected)
    from pneumoscan.preprocess import load_luma

    assert answer["warnings"] == load_luma(path)[1]
    if name.startswith("lateral"):
        assert len(answer["warnings"]) == 2


def _refusals() -> list[tuple[str, object, str | None]]:
    """(name, writer, the page's sentence when not Python's): what is not one image."""
    from test_dicom import REFUSALS

    cases = [(name, make, None) for name, make, _ in REFUSALS if name != "JPEG-LS"]
    jpeg_ls = next(make for name, make, _ in REFUSALS if name == "JPEG-LS")
    cases.append(
        (
            "JPEG-LS",
            jpeg_ls,
            "its pixel data is JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80), which this "
            "page cannot decode; try `pneumoscan predict`, which also reads JPEG extended, JPEG 2000 "
            "and deflated files.",
        )
    )
    cases.append(
        (
            "deflated",  # Python reads it: the page points there
            lambda p: write_dicom(p, DICOM_SOURCE, syntax="deflated"),
            "its pixel data is Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99), which this "
            "page cannot decode; try `pneumoscan predict`, which also reads JPEG extended, JPEG 2000 "
            "and deflated files.",
        )
    )
    cases.append(
        (
            "a bare data set: no preamble, no file meta group",
            lambda p: _recode(write_dicom(p, DICOM_SOURCE), raw=True),
            "is not a readable DICOM file (it has no file meta information to give its transfer syntax).",
        )
    )
    cases.append(
        (
            "a palette",
            lambda p: _recode(write_dicom(p, DICOM_SOURCE), PhotometricInterpretation="PALETTE COLOR"),
            "has a pixel layout this page does not read (PALETTE COLOR, 1 samples, 8 bits); "
            "`pneumoscan predict` may.",
        )
    )
    return cases


@pytest.mark.parametrize("name, make, sentence", _refusals(), ids=[r[0] for r in _refusals()])
def test_dicom_refusals_are_pythons_sentences(page, name, make, sentence):
    """A report, several frames, a syntax the page does not decode: one sentence, Python's where
    both refuse alike, and never the patient's name."""
    path = page.write("odd.dcm", b"")
    make(path)
    answer = page.ask(path)
    expected = _python("odd.dcm", path.read_bytes())
    if sentence is None:
        assert answer.get("error") == expected["error"], answer
    else:
        assert answer.get("error") == f"odd.dcm: {sentence}", answer
    assert "Doe" not in json.dumps(answer)


# (what the decode step says, accepted, the refusal's start)
DICOM_CONTRACTS = [
    ("as Python writes it", {}, True, None),
    ("a bundle from before DICOM: no formats, no dicom", {"formats": None, "dicom": None}, True, None),
    ("formats without a dicom object", {"dicom": None}, True, None),
    ("DICOM not among the formats", {"formats": ["jpeg", "png"], "dicom": None}, True, None),
    ("another format", {"formats": ["jpeg", "png", "dicom", "webp"]}, False, "decode.formats"),
    ("another window", {"dicom": {"window": "VOI LUT only"}}, False, "decode.dicom.window must be"),
    (
        "a syntax the page cannot decode",
        {"dicom": {"transfer_syntaxes": {"1.2.840.10008.1.2.4.80": "JPEG-LS Lossless Image Compression"}}},
        False,
        "decode.dicom.transfer_syntaxes lists 1.2.840.10008.1.2.4.80 (JPEG-LS Lossless Image "
        "Compression), which this page cannot decode.",
    ),
]


@pytest.mark.parametrize(
    "change, accepted, refusal", [c[1:] for c in DICOM_CONTRACTS], ids=[c[0] for c in DICOM_CONTRACTS]
)
def test_page_follows_only_the_dicom_contract_it_implements(page, change, accepted, refusal):
    metadata = _metadata()
    decode = metadata["preprocessing"][0]
    for key, value in change.items():
        if value is None:
            del decode[key]
        elif isinstance(value, dict):
            decode[key] = {**decode[key], **value}
        else:
            decode[key] = value
    answer = page.check_metadata(metadata)
    if accepted:
        assert "plan" in answer, answer
        dicom = answer["plan"]["dicom"]
        assert (dicom is None) == ("dicom" not in decode.get("formats", ["dicom"]))
    else:
        assert answer.get("error", "").startswith(f"metadata.json: {refusal}"), answer


# ---- awkward and damaged headers: the page against pydicom's own functions (issue 20) ----------


def _awkward():
    from test_dicom import awkward_cases

    return awkward_cases(DICOM_SOURCE)


@pytest.mark.parametrize("name", list(_awkward()))
def test_dicom_page_reads_awkward_headers_as_pydicoms_functions(page, name):
    """16-bit planar colour, big endian 8-bit OW, VOI LUT data of VR US or in big endian, an
    empty window: the page gives the luma pydicom's functions give, not only Python's."""
    from test_dicom import pydicom_reference

    path = page.write(name.replace(",", "") + ".dcm", b"")
    _awkward()[name](path)
    answer = page.ask(path)
    assert "error" not in answer, answer
    luma = np.frombuffer(base64.b64decode(answer["luma"]), np.uint8).reshape(
        answer["height"], answer["width"]
    )
    np.testing.assert_array_equal(luma, pydicom_reference(path))
    _check(answer, _python(path.name, path.read_bytes()))


def _modality_lut_table(path: Path) -> Path:
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item["LUTData"] = DataElement(0x00283006, "OW", (np.arange(256, dtype="<u2") * 200).tobytes())
    item.ModalityLUTType = "OD"
    return write_dicom(path, DICOM_SOURCE, ModalityLUTSequence=Sequence([item]))


@pytest.mark.parametrize(
    "name",
    [
        "a value of a length its VR cannot have: BytesLengthException",
        "an unknown VR",
        "a damaged transfer syntax",
    ],
)
def test_dicom_page_refuses_damaged_headers_in_one_sentence(page, name):
    from test_dicom import BROKEN

    make = next(make for case, make, _ in BROKEN if case.startswith(name))
    path = page.write("broken.dcm", b"")
    make(path)
    answer = page.ask(path)
    assert answer.get("kind") == "ImageError" and answer["error"].startswith("broken.dcm: "), answer
    assert "\n" not in answer["error"] and "Doe" not in answer["error"] and "1>2" not in answer["error"]
    assert answer["error"].isascii() and answer["error"].isprintable()
    assert "error" in _python("broken.dcm", path.read_bytes())


@pytest.mark.parametrize(
    "name, make, sentence",
    [
        (
            "a VOI LUT shorter than its descriptor",
            lambda p: write_dicom(p, DICOM_SOURCE, bits=12, VOILUTSequence=_short_lut()),
            "its VOI LUT holds 1000 of the 4096 entries its descriptor says.",
        ),
        (
            "a modality LUT table",
            _modality_lut_table,
            "its modality LUT is a table (a Modality LUT Sequence), which this page does not apply; "
            "`pneumoscan predict` does.",
        ),
    ],
)
def test_dicom_page_refusals_of_tables(page, name, make, sentence):
    path = page.write("odd.dcm", b"")
    make(path)
    assert page.ask(path).get("error") == f"odd.dcm: {sentence}"


def _short_lut():
    from test_dicom import voi_lut

    return voi_lut(16, 4096, 0, held=1000)


def test_python_applies_a_modality_lut_table_as_pydicom_does(tmp_path):
    from test_dicom import pydicom_reference

    path = _modality_lut_table(tmp_path / "m.dcm")
    np.testing.assert_array_equal(load_grayscale(path), pydicom_reference(path))
