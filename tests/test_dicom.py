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
