"""DICOM files to 8-bit luma: `pneumoscan predict|evaluate|explain|train` on `.dcm` files (and on
files without an extension that start with the DICOM preamble), the same steps as the page.

pydicom reads the file, imported only when a DICOM file is met (so a start that meets none stays
fast), and decodes the pixel data: uncompressed, deflated, RLE Lossless (pydicom's own
decoder), JPEG baseline and extended and JPEG 2000 (Pillow's decoders). JPEG lossless, JPEG-LS
and the other compressed syntaxes would need decoders under licences (GPL) this project does not take on:
such a file gets one sentence naming its transfer syntax.

Grayscale (MONOCHROME1/2, 8-16 bits stored, signed or not): the modality LUT (rescale slope and
intercept) gives values x; the VOI LUT sequence, else the first window (centre c, width w, the
DICOM linear function of PS3.3 C.11.2.1.2.1, or SIGMOID when VOI LUT Function says so), else
the range x can take (the stored bits through the modality LUT), maps x to 0..255 (rounded half
up); MONOCHROME1 is inverted (255 - y). Colour (RGB, YBR) goes to RGB and then to luma like
any colour image. Multi-frame images, objects without pixel data (structured reports, RT plans)
and files pydicom cannot read get one sentence each. Nothing from the header about the patient
(name, id, dates) is read into a message, a record or a log.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DICOM_SUFFIXES = (".dcm", ".dicom")
PREAMBLE = 128  # bytes before the "DICM" prefix of a DICOM Part 10 file
WINDOW_RULE = (
    "modality LUT (rescale slope, intercept); then the VOI LUT sequence, else the first window "
    "(PS3.3 C.11.2.1.2.1 LINEAR, LINEAR_EXACT or SIGMOID), else the range of the stored bits, "
    "to 0..255 rounded half up; MONOCHROME1 inverted; colour to RGB, then luma"
)
# What the page and Python both decode: explicit and implicit VR little endian, explicit big
# endian, RLE Lossless, JPEG baseline (8 bit). Python also reads deflated files and what Pillow
# decodes (JPEG extended, JPEG 2000); the page sends those to `pneumoscan predict`. JPEG
# lossless and JPEG-LS have no decoder here and are refused.
TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
}
# Views and body parts that a frontal chest X-ray is not: each adds a warning to the record.
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "LLD", "RLD", "XCL")


from pneumoscan.errors import DicomError  # noqa: E402  (defined in errors.py since it holds them all)


@dataclass
class Decoded:
    """A DICOM image as 8-bit pixels: `luma` (H, W) or `rgb` (H, W, 3), and header warnings."""

    luma: np.ndarray | None = None
    rgb: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)


def is_dicom(data: bytes, path: Path) -> bool:
    """A `.dcm`/`.dicom` file, or any file with the DICOM preamble and `DICM` prefix."""
    return path.suffix.lower() in DICOM_SUFFIXES or data[PREAMBLE : PREAMBLE + 4] == b"DICM"


def has_dicom_preamble(path: Path) -> bool:
    """Whether a file (of any name) starts like a DICOM Part 10 file."""
    try:
        with open(path, "rb") as handle:
            return handle.read(PREAMBLE + 4)[PREAMBLE:] == b"DICM"
    except OSError:
        return False


def decode(path: Path, data: bytes) -> Decoded:
    """The pixels of a single-frame DICOM image, windowed to 8 bits.

    Raises:
        DicomError: not readable as DICOM, no pixel data, several frames, a transfer syntax
            without a decoder here, or an unusual pixel layout.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=path.suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, EOFError, ValueError, TypeError, AttributeError, KeyError) as error:
        raise DicomError(f"{path}: is not a readable DICOM file ({type(error).__name__}).") from None
    if data[PREAMBLE : PREAMBLE + 4] != b"DICM" and "SOPClassUID" not in ds and "PixelData" not in ds:
        raise DicomError(f"{path}: is not a readable DICOM file (no DICOM preamble, no known attributes).")
    if "PixelData" not in ds:
        kind = str(ds.get("Modality", "")) or "object"
        raise DicomError(f"{path}: is a DICOM {kind} without pixel data (a report or plan, not an image).")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"{path}: is a multi-frame DICOM image ({frames} frames); give one frame a file.")
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    try:
        pixels = ds.pixel_array
    except Exception as error:  # every decoder's failure (a missing one included) is one sentence
        name = getattr(syntax, "name", str(syntax))
        raise DicomError(
            f"{path}: its pixel data ({name}) cannot be decoded here ({type(error).__name__})."
        ) from None
    decoded = Decoded(warnings=_warnings(ds))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples == 3:
        decoded.rgb = _to_rgb8(ds, pixels)
        return decoded
    if samples != 1 or pixels.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"{path}: has a pixel layout pneumoscan does not read ({photometric}, {samples} samples)."
        )
    decoded.luma = window(ds, pixels)
    return decoded


def window(ds, pixels: np.ndarray) -> np.ndarray:
    """Stored grayscale values -> 0..255 by the module docstring's rule."""
    x = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        y = _voi_lut(ds.VOILUTSequence[0], x)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        y = _window(x, centre, width, function)
    else:
        low, high = _stored_range(ds)
        y = (x - low) / max(high - low, 1e-12)
    out = np.floor(np.clip(y, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return 255 - out if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1" else out


def _window(x: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """The window as a fraction 0..1 of the output range (PS3.3 C.11.2.1.2)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))
    if function == "LINEAR_EXACT":
        return (x - centre) / width + 0.5
    if width <= 1:  # LINEAR with width 1 is a threshold at the centre
        return (x >= centre - 0.5).astype(np.float64)
    return (x - (centre - 0.5)) / (width - 1) + 0.5


def _voi_lut(item, x: np.ndarray) -> np.ndarray:
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    table = np.frombuffer(item.LUTData, np.uint8 if bits <= 8 and len(item.LUTData) == entries else "<u2")
    table = np.asarray(table[:entries], np.float64)
    index = np.clip(np.rint(x).astype(np.int64) - first, 0, entries - 1)
    return table[index] / float(2**bits - 1)


def _stored_range(ds) -> tuple[float, float]:
    """The values the stored bits can take, through the modality LUT."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]


def _to_rgb8(ds, pixels: np.ndarray) -> np.ndarray:
    """Colour pixels (pydicom hands YBR over as RGB) as 8-bit RGB: wider samples keep their
    high byte, as for 16-bit colour PNGs."""
    rgb = pixels
    if rgb.dtype != np.uint8:
        bits = int(ds.get("BitsStored", 16))
        rgb = (rgb.astype(np.int64) >> max(bits - 8, 0)).clip(0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., :3])


def _first(value) -> float:
    """A window attribute's first value (they may be multi-valued)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _warnings(ds) -> list[str]:
    """Header facts that say this is not a frontal chest X-ray (no patient data in them)."""
    found = []
    view = str(ds.get("ViewPosition", "")).upper()
    if view in LATERAL_VIEWS:
        found.append(f"the header says the view is lateral ({view}); the model reads frontal chest X-rays")
    part = str(ds.get("BodyPartExamined", "")).upper()
    if part and part not in ("CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS"):
        found.append(f"the header says the body part is {part}, not the chest")
    return found
