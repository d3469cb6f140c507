"""pneumoscan.dicom: DICOM files made from the sample X-rays (pydicom) read back as the JPEG they
came from, through predict too; what is not a single chest image gets one sentence; the
header's patient data never shows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLES, write_dicom
from pneumoscan.cli import main
from pneumoscan.data import find_images
from pneumoscan.preprocess import ImageError, load_grayscale, load_luma

SOURCE = SAMPLES / "PNEUMONIA" / "person19_bacteria_61.jpeg"
GRAY = load_grayscale(SOURCE)

# name, write_dicom options, largest |level difference| from the JPEG's luma
VARIANTS = [
    ("monochrome2 8 bit", {}, 0),
    ("monochrome1 8 bit", {"photometric": "MONOCHROME1"}, 0),
    ("12 bit", {"bits": 12}, 0),
    ("16 bit", {"bits": 16}, 0),
    ("12 bit, a VOI window", {"bits": 12, "window": True}, 0),
    ("monochrome1 16 bit, a VOI window", {"bits": 16, "window": True, "photometric": "MONOCHROME1"}, 0),
    ("RLE lossless", {"syntax": "rle"}, 0),
    ("RLE lossless 16 bit", {"syntax": "rle", "bits": 16}, 0),
    ("JPEG baseline", {"syntax": "jpeg-baseline"}, 8),
    ("explicit big endian 16 bit", {"syntax": "explicit-big", "bits": 16}, 0),
]


@pytest.mark.parametrize("name, options, tolerance", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_each_variant_reads_back_as_the_source(tmp_path, name, options, tolerance):
    luma = load_grayscale(write_dicom(tmp_path / "x.dcm", GRAY, **options))
    assert luma.shape == GRAY.shape and luma.dtype == np.uint8
    assert int(np.abs(luma.astype(int) - GRAY).max()) <= tolerance


def test_predict_gives_the_jpegs_label_and_probability(tmp_path, capsys):
    folder = tmp_path / "dicom"
    folder.mkdir()
    for index, (_, options, _) in enumerate(VARIANTS):
        write_dicom(folder / f"{index:02d}.dcm", GRAY, **options)
    write_dicom(folder / "no-extension", GRAY)  # found by its preamble
    assert main(["predict", "--format", "json", str(SOURCE)]) == 0
    reference = json.loads(capsys.readouterr().out)[0]
    assert main(["predict", "--format", "json", str(folder)]) == 0
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert len(records) == len(VARIANTS) + 1
    for record in records:
        assert record["label"] == reference["label"], record
        assert abs(record["probability"] - reference["probability"]) <= 0.02, record
    assert "Doe" not in out + err and "SECRET-ID" not in out + err  # the header's patient data


# name, make(path), the sentence's telling part
def _structured_report(path: Path) -> None:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPInstanceUID = ExplicitVRLittleEndian, generate_uid()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds = Dataset()
    ds.file_meta, ds.Modality, ds.PatientName = meta, "SR", "Doe^Jane"
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _multi_frame(path: Path) -> None:
    write_dicom(path, np.concatenate([GRAY, GRAY]), NumberOfFrames=2)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows = GRAY.shape[0]
    ds.save_as(path)


def _jpeg_ls(path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(write_dicom(path, GRAY, syntax="jpeg-baseline"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless: no decoder here
    ds.save_as(path)


REFUSALS = [
    ("a structured report", _structured_report, "is a DICOM SR without pixel data"),
    ("two frames", _multi_frame, "is a multi-frame DICOM image (2 frames)"),
    ("JPEG-LS", _jpeg_ls, "cannot be decoded here"),
    ("not DICOM at all", lambda p: p.write_bytes(b"\0" * 200), "is not a readable DICOM file"),
]


@pytest.mark.parametrize("name, make, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_what_is_not_one_image_gets_one_sentence(tmp_path, name, make, message):
    path = tmp_path / "odd.dcm"
    make(path)
    with pytest.raises(ImageError) as raised:
        load_grayscale(path)
    text = str(raised.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text
    assert "Doe" not in text


@pytest.mark.parametrize(
    "header, warning",
    [
        ({"ViewPosition": "LL"}, "the header says the view is lateral (LL)"),
        ({"BodyPartExamined": "KNEE"}, "the header says the body part is KNEE, not the chest"),
        ({"ViewPosition": "PA", "BodyPartExamined": "CHEST"}, None),
    ],
)
def test_a_header_that_is_not_a_frontal_chest_warns(tmp_path, header, warning, capsys):
    path = write_dicom(tmp_path / "x.dcm", GRAY, **header)
    warnings = load_luma(path)[1]
    assert len(warnings) == (1 if warning else 0) and all(w.startswith(warning) for w in warnings)
    assert main(["predict", "--format", "json", str(path)]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert (warning is None and "warning" not in record) or record["warning"].startswith(f"{path}: {warning}")


def test_dicom_files_are_training_data_too(tmp_path):
    folder = tmp_path / "NORMAL"
    folder.mkdir()
    write_dicom(folder / "IM-0001-0001.dcm", GRAY)
    write_dicom(folder / "IM-0002-0001", GRAY)
    (folder / "notes").write_text("not DICOM, no extension")
    shutil.copy(SOURCE, folder / "IM-0003-0001.jpeg")
    assert [p.name for p in find_images(folder)] == ["IM-0001-0001.dcm", "IM-0002-0001", "IM-0003-0001.jpeg"]


def test_pydicom_is_imported_only_when_a_dicom_file_is_met():
    code = (
        "import sys; from pneumoscan.preprocess import load_grayscale; "
        f"load_grayscale({str(SOURCE)!r}); print('pydicom' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_colour_dicom_goes_to_luma_like_any_colour_image(tmp_path):
    import pydicom

    rgb = np.asarray(Image.open(SOURCE).convert("RGB")).copy()
    rgb[..., 0] = 255 - rgb[..., 0]  # three different channels
    path = write_dicom(tmp_path / "c.dcm", GRAY)
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    ds.save_as(path)
    png = tmp_path / "c.png"
    Image.fromarray(rgb).save(png)
    np.testing.assert_array_equal(load_grayscale(path), load_grayscale(png))


# ---- legal but awkward headers, checked against pydicom's own functions ------------------------


def pydicom_reference(path: Path) -> np.ndarray:
    """The 8-bit luma pydicom's own functions give a file, as an independent reference: the whole
    `pixel_array` through `apply_modality_lut` and `apply_voi_lut`, as a fraction of the output
    range each defines (2^bits - 1 for a VOI LUT, the stored range through the rescale for a
    window or none), rounded half up; colour keeps the high byte of each sample, then BT.601."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path, force=True)
    pixels = ds.pixel_array
    if ds.SamplesPerPixel == 3:
        rgb = (pixels >> max(ds.BitsStored - 8, 0)).astype(np.uint32)
        return ((rgb @ np.array([19595, 38470, 7471], np.uint32) + 32768) >> 16).astype(np.uint8)
    x = apply_modality_lut(pixels, ds)
    bits, signed = ds.BitsStored, ds.PixelRepresentation == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    y_min, y_max = low * slope + intercept, high * slope + intercept
    if ds.get("ModalityLUTSequence"):  # the range of its table's entries (PS3.3 C.11.1.1.1)
        y_min, y_max = 0, 2 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    if ds.get("VOILUTSequence"):  # the input clamped to the table's (pydicom wraps 8-bit indices)
        entries, first, lut_bits = ds.VOILUTSequence[0].LUTDescriptor
        lookup = np.clip(np.rint(x), first, first + (entries or 65536) - 1).astype(np.int64)
        fraction = apply_voi_lut(lookup, ds) / (2**lut_bits - 1)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        fraction = (apply_voi_lut(x, ds) - y_min) / (y_max - y_min)
    else:
        fraction = (x - min(y_min, y_max)) / abs(y_max - y_min)
    out = np.floor(np.clip(fraction, 0, 1) * 255 + 0.5).astype(np.uint8)
    return 255 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out


def voi_lut(bits: int, entries: int, first: int, vr: str = "OW", order: str = "<", held: int | None = None):
    """A VOI LUT sequence of one item: `entries` values of a gamma-like curve from `first` on,
    LUTData of VR `vr` (OW bytes in byte `order`, or US values), `held` of them when given."""
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    curve = np.rint((np.linspace(0, 1, entries) ** 0.7) * (2**bits - 1)).astype(np.uint16)[:held]
    item = Dataset()
    item.LUTDescriptor = [entries % 65536, first, bits]  # 0 means 65,536
    value = [int(v) for v in curve] if vr == "US" else curve.astype(f"{order}u2").tobytes()
    item["LUTData"] = DataElement(0x00283006, vr, value)
    return Sequence([item])


def _big_endian_8bit_ow(path: Path) -> Path:
    """8-bit pixels in a big endian file as OW: stored in 16-bit words, each pair swapped."""
    import pydicom

    gray = GRAY[:, :-1] if GRAY.shape[1] % 2 == 0 else GRAY  # an odd count: a padding byte too
    write_dicom(path, gray, syntax="explicit-big")
    ds = pydicom.dcmread(path, force=True)
    padded = gray.tobytes() + b"\0" * (gray.size % 2)
    ds.PixelData = np.frombuffer(padded, ">u2").astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    pydicom.dcmwrite(path, ds, little_endian=False, implicit_vr=False)
    return path


def colour_dicom(path: Path, source: np.ndarray, planar: int, bits: int = 8) -> Path:
    """An RGB DICOM file of three different channels made from `source`, planar or not."""
    import pydicom

    rgb = np.stack([source, source[::-1], 255 - source], -1).astype(np.uint16)
    if bits > 8:
        rgb = rgb * 16 + 7  # 12 bits stored
    pixels = rgb.transpose(2, 0, 1) if planar else rgb
    ds = pydicom.dcmread(write_dicom(path, source, bits=bits))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", planar
    ds.PixelData = pixels.astype(np.uint8 if bits == 8 else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def awkward_cases(source: np.ndarray) -> dict:
    """name -> writer of a legal file with a header that is easy to misread (issue 20)."""
    return {
        "empty window, rescaled": lambda p: write_dicom(
            p, source, bits=12, WindowCenter="", WindowWidth="", RescaleSlope=2, RescaleIntercept=-100
        ),
        "VOI LUT data of VR US": lambda p: write_dicom(
            p, source, bits=16, VOILUTSequence=voi_lut(16, 4096, 20000, "US")
        ),
        "VOI LUT, big endian, OW": lambda p: write_dicom(
            p, source, bits=16, syntax="explicit-big", VOILUTSequence=voi_lut(12, 4096, 30000, "OW", ">")
        ),
        "VOI LUT, big endian, US": lambda p: write_dicom(
            p, source, bits=12, syntax="explicit-big", VOILUTSequence=voi_lut(16, 4096, 0, "US")
        ),
        "VOI LUT, 8-bit entries in 16-bit words": lambda p: write_dicom(
            p, source, bits=12, VOILUTSequence=voi_lut(8, 256, 1000)
        ),
        "big endian 8 bit OW": _big_endian_8bit_ow,
        "RGB planar 12 bit": lambda p: colour_dicom(p, source, planar=1, bits=12),
        "window, signed, rescaled": lambda p: write_dicom(
            p,
            source,
            bits=12,
            PixelRepresentation=1,
            RescaleSlope=2,
            RescaleIntercept=-1024,
            WindowCenter=-300,
            WindowWidth=3001,
        ),
    }


AWKWARD = awkward_cases(GRAY)


@pytest.mark.parametrize("name", AWKWARD)
def test_awkward_headers_read_as_pydicoms_functions_read_them(tmp_path, name):
    path = AWKWARD[name](tmp_path / "x.dcm")
    np.testing.assert_array_equal(load_grayscale(path), pydicom_reference(path))


def test_an_8_bit_voi_lut_of_more_than_256_entries_is_read_whole(tmp_path):
    """pydicom 3.0's `apply_voi` wraps indices past 255 for 8-bit entries: entry k of 4096 is
    the table's k-th, not its (k mod 256)-th."""
    import pydicom

    path = write_dicom(tmp_path / "x.dcm", GRAY, bits=12, VOILUTSequence=voi_lut(8, 4096, 0))
    ds = pydicom.dcmread(path)
    table = np.frombuffer(ds.VOILUTSequence[0].LUTData, "<u2")
    np.testing.assert_array_equal(load_grayscale(path), table[ds.pixel_array])


def _damage(path: Path, keyword_tag: bytes, vr: bytes, replacement: bytes) -> Path:
    """Rewrite one explicit little-endian element (tag bytes, VR) with a raw `replacement` of VR,
    length and value."""
    data = path.read_bytes()
    at = data.index(keyword_tag + vr)
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    path.write_bytes(data[:at] + keyword_tag + replacement + data[at + 8 + length :])
    return path


LUT_DESCRIPTOR, VIEW_POSITION = b"\x28\x00\x02\x30", b"\x18\x00\x01\x51"
BROKEN = [
    (
        "a value of a length its VR cannot have: BytesLengthException",
        lambda p: _damage(
            write_dicom(p, GRAY, bits=12, VOILUTSequence=voi_lut(16, 4096, 0)),
            LUT_DESCRIPTOR,
            b"US",
            b"UL\x06\x00\x00\x10\x00\x00\x10\x00",  # 6 bytes are no whole number of UL values
        ),
        "(BytesLengthException)",
    ),
    (
        "an unknown VR: NotImplementedError",
        lambda p: _damage(write_dicom(p, GRAY, ViewPosition="PA"), VIEW_POSITION, b"CS", b"ZZ\x02\x00PA"),
        "(NotImplementedError)",
    ),
    (
        "a damaged transfer syntax UID, not quoted",
        lambda p: _replace(write_dicom(p, GRAY), b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1>2.\xea\0"),
        "its pixel data (an unreadable transfer syntax) cannot be decoded here (NotImplementedError).",
    ),
    (
        "LUT data shorter than its descriptor",
        lambda p: write_dicom(p, GRAY, bits=12, VOILUTSequence=voi_lut(16, 4096, 0, held=1000)),
        "its VOI LUT holds 1000 of the 4096 entries its descriptor says.",
    ),
    (
        "a JPEG frame larger than the header says",
        lambda p: _shrunk_header(write_dicom(p, GRAY, syntax="jpeg-baseline")),
        f"its JPEG frame is {GRAY.shape[1]}x{GRAY.shape[0]} pixels, the header says 40x40.",
    ),
    (
        "a JPEG 2000 frame larger than the header says",
        lambda p: _jpeg_2000(p, 40, 40),
        f"its JPEG 2000 frame is {GRAY.shape[1]}x{GRAY.shape[0]} pixels, the header says 40x40.",
    ),
]


def _jpeg_2000(path: Path, rows: int, columns: int) -> Path:
    """GRAY as a JPEG 2000 (lossless) DICOM file whose header says `rows` x `columns`."""
    import io

    import pydicom
    from pydicom.encaps import encapsulate

    buffer = io.BytesIO()
    Image.fromarray(GRAY).save(buffer, format="JPEG2000", irreversible=False, no_jp2=True)
    ds = pydicom.dcmread(write_dicom(path, GRAY))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].is_undefined_length = True
    ds.Rows, ds.Columns = rows, columns
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_jpeg_2000_frame_reads_when_it_is_the_size_its_header_says(tmp_path):
    np.testing.assert_array_equal(load_grayscale(_jpeg_2000(tmp_path / "x.dcm", *GRAY.shape)), GRAY)


def _replace(path: Path, old: bytes, new: bytes) -> Path:
    path.write_bytes(path.read_bytes().replace(old, new))
    return path


def _shrunk_header(path: Path) -> Path:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 40
    ds.save_as(path)
    return path


@pytest.mark.parametrize("name, make, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_damaged_files_get_one_sentence(tmp_path, name, make, message):
    path = make(tmp_path / "x.dcm")
    with pytest.raises(ImageError) as raised:
        load_grayscale(path)
    text = str(raised.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text
    assert "\\x" not in text and "Doe" not in text  # no header bytes


def test_the_size_guard_reads_the_header_before_decoding(tmp_path, monkeypatch):
    """A small RLE file that declares 20,000 x 20,000 pixels is refused before any decoder runs."""
    import pydicom
    from pydicom.dataset import Dataset

    path = write_dicom(tmp_path / "huge.dcm", GRAY, syntax="rle")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 20_000
    ds.save_as(path)
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("decoded")))
    with pytest.raises(ImageError, match=r"20000x20000 pixels is over the 50 MP limit\.$"):
        load_grayscale(path)


def test_a_bad_file_in_the_middle_of_a_predict_batch_costs_only_its_record(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(SOURCE, folder / "a.jpeg")
    AWKWARD["empty window, rescaled"](folder / "b.dcm")
    BROKEN[0][1](folder / "c.dcm")
    AWKWARD["VOI LUT data of VR US"](folder / "d.dcm")
    shutil.copy(SOURCE, folder / "e.jpeg")
    assert main(["predict", "--format", "json", str(folder)]) == 1
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert [Path(r["path"]).name for r in records] == ["a.jpeg", "b.dcm", "c.dcm", "d.dcm", "e.jpeg"]
    assert [("error" in r) for r in records] == [False, False, True, False, False]
    assert "Traceback" not in err and "\\x" not in out + err


def test_pydicoms_warnings_become_one_warning_phrase_not_stderr_lines(tmp_path, capsys):
    """An RLE segment with a byte too many: pydicom reads it, warning (on stderr, by default);
    the record gets one warning phrase instead, and nothing reaches stderr but the sentence."""
    import warnings

    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    from pneumoscan.dicom import DAMAGE_WARNING

    path = write_dicom(tmp_path / "padded.dcm", GRAY, syntax="rle")
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame + b"\x00\x07"])  # a literal run of one byte past the end
    ds.save_as(path)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        luma, phrases = load_luma(path)
    assert escaped == [] and phrases == [DAMAGE_WARNING]
    np.testing.assert_array_equal(
        luma, load_grayscale(write_dicom(tmp_path / "whole.dcm", GRAY, syntax="rle"))
    )
    assert main(["predict", "--format", "json", str(path)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["warning"] == f"{path}: {DAMAGE_WARNING}."
    assert "UserWarning" not in err and "warn_and_log" not in err and "non-conformant" not in err


def test_a_deflate_bomb_is_refused_before_it_is_inflated(tmp_path, monkeypatch):
    """A deflated data set that inflates past the limit is refused from a bounded inflation, and
    a deflated file under it still reads."""
    import zlib

    import pneumoscan.dicom

    good = write_dicom(tmp_path / "good.dcm", GRAY, syntax="deflated")
    np.testing.assert_array_equal(load_grayscale(good), GRAY)
    data = good.read_bytes()
    start = 128 + 16 + int.from_bytes(data[140:144], "little")
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(bytes(2_000_000)) + packer.flush()  # 2 MB of zeros in ~2 KB
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data[:start] + bomb)
    monkeypatch.setattr(pneumoscan.dicom, "INFLATED_LIMIT", 1_000_000)
    with pytest.raises(ImageError, match=r"bomb\.dcm: its deflated data set inflates to over 1 MB, "):
        load_grayscale(path)


def test_training_scan_and_explain_keep_going_past_a_damaged_dicom_file(tmp_path):
    """The rule holds beyond predict: `data.scan` (train, evaluate) lists the damaged file as
    unreadable with its sentence and keeps the rest; `explain` gives it an error record."""
    from pneumoscan.data import scan
    from pneumoscan.explain import explain_files

    for name in ("NORMAL", "PNEUMONIA"):
        (tmp_path / name).mkdir()
        shutil.copy(SOURCE, tmp_path / name / "a.jpeg")
    broken = BROKEN[0][1](tmp_path / "NORMAL" / "b.dcm")
    found = scan(tmp_path)
    assert sorted(sample.relpath for sample in found.samples) == ["NORMAL/a.jpeg", "PNEUMONIA/a.jpeg"]
    assert found.unreadable == [f"{broken}: its pixel attributes cannot be used (BytesLengthException)."]
    paths = [tmp_path / "NORMAL" / "a.jpeg", broken, tmp_path / "PNEUMONIA" / "a.jpeg"]
    records = explain_files(None, paths, tmp_path / "maps")
    assert [("error" in record) for record in records] == [False, True, False]
    assert records[1]["error"] == found.unreadable[0]
