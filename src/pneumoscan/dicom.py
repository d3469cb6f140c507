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
any colour image. pydicom's own `apply_modality_lut` (so a Modality LUT Sequence too),
`apply_voi` and `apply_windowing` do that arithmetic, on a table of every value the stored bits
can take. Multi-frame images, objects without pixel data (structured reports, RT plans)
and files pydicom cannot read get one sentence each: whatever a file holds, it costs only its
own record. Rows x Columns (and a JPEG or JPEG 2000 frame's own header) are checked against the
size limit before any pixel is decoded. Nothing from the header about the patient (name, id,
dates) is read into a message, a record or a log, nor are pydicom's messages (they can quote
header bytes): a sentence names the exception's type only.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
import zlib
from collections.abc import Callable
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
_CODE_STRING = re.compile(r"[A-Za-z0-9 _]{1,16}")
# The warning phrase of a file pydicom read despite damage (its warnings are not shown).
DAMAGE_WARNING = "the file is damaged in places pydicom read around, so its pixels may be wrong"
_PYDICOM = threading.Lock()
# The most a deflated data set may inflate to: 50 MP of 16-bit RGB, and room for a header.
INFLATED_LIMIT = 320_000_000
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


def decode(path: Path, data: bytes, check_size: Callable[[int, int], None] | None = None) -> Decoded:
    """The pixels of a single-frame DICOM image, windowed to 8 bits.

    Whatever the bytes hold, the outcome is the image or one `DicomError` sentence: every
    exception pydicom or NumPy raises on a damaged or unusual file becomes one (its type named,
    never its text, which can quote header values). pydicom's warnings, printed on stderr with
    the header's bytes in them, are caught instead: a file pydicom read around damage in gets
    one warning phrase (`DAMAGE_WARNING`); its value checks are off (a value out of its VR's
    rules is read as it is, as the page reads it).

    Args:
        check_size: called with (columns, rows) from the header before any pixel is decoded (and
            from a JPEG or JPEG 2000 frame's own header); it raises to refuse the size.

    Raises:
        DicomError: not readable as DICOM, no pixel data, several frames, a transfer syntax
            without a decoder here, a frame other than the header says, or an unusual layout.
    """
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # catch_warnings swaps process-wide state: one file at a time in here, and what other
    # threads warn meanwhile is shown as it would have been.
    with _PYDICOM, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            decoded = _decode(path, data, check_size)
        finally:
            damaged = False
            for warning in caught:
                if "pydicom" in warning.filename:
                    damaged = True
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if damaged:
        decoded.warnings.append(DAMAGE_WARNING)
    return decoded


def _decode(path: Path, data: bytes, check_size: Callable[[int, int], None] | None) -> Decoded:
    try:
        ds = _read(path, data)
        rows, columns = int(ds.Rows), int(ds.Columns)
    except DicomError:
        raise
    except Exception as error:  # a damaged header: whatever pydicom raises, one sentence
        raise DicomError(f"{path}: is not a readable DICOM file ({type(error).__name__}).") from None
    if check_size is not None:
        check_size(columns, rows)
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
    name = _syntax_name(syntax)
    try:
        frame_size = _frame_size(ds, syntax)
        if frame_size is not None and frame_size != (columns, rows):
            raise DicomError(
                f"{path}: its {_FRAME_KINDS[syntax]} frame is {frame_size[0]}x{frame_size[1]} pixels, "
                f"the header says {columns}x{rows}."
            )
        pixels = ds.pixel_array
    except DicomError:
        raise
    except Exception as error:  # every decoder's failure (a missing one included) is one sentence
        raise DicomError(
            f"{path}: its pixel data ({name}) cannot be decoded here ({type(error).__name__})."
        ) from None
    try:
        return _to_8bit(path, ds, pixels)
    except DicomError:
        raise
    except Exception as error:  # a header value pydicom or NumPy cannot use
        raise DicomError(f"{path}: its pixel attributes cannot be used ({type(error).__name__}).") from None


def _syntax_name(uid: str) -> str:
    """A transfer syntax's name as a message may give it: pydicom's name for a UID it knows, the
    UID when it is one (digits and dots), else not the bytes a damaged header holds there."""
    from pydicom.uid import UID_dictionary

    if uid in UID_dictionary:
        return UID_dictionary[uid][0]
    if not uid:
        return "no transfer syntax given"
    return uid if re.fullmatch(r"[0-9.]{1,64}", uid) else "an unreadable transfer syntax"


def _check_inflated_size(path: Path, data: bytes) -> None:
    """A deflated data set is inflated whole by pydicom: one that would inflate past
    `INFLATED_LIMIT` (a few hundred bytes can hold gigabytes) is refused before it is. The file
    meta group's length is read from its first element, (0002,0000) UL, after the preamble."""
    meta = data[PREAMBLE + 4 : PREAMBLE + 16]
    if data[PREAMBLE : PREAMBLE + 4] != b"DICM" or b"1.2.840.10008.1.2.1.99" not in data[:1024]:
        return
    if meta[:6] != b"\x02\x00\x00\x00UL":
        return  # no group length: pydicom reads it (or refuses it) as it is
    start = PREAMBLE + 16 + int.from_bytes(meta[8:12], "little")
    inflater, pending, total = zlib.decompressobj(-zlib.MAX_WBITS), data[start:], 0
    try:
        while total <= INFLATED_LIMIT:  # 16 MB at a time, counted and dropped
            total += len(out := inflater.decompress(pending, 1 << 24))
            pending = inflater.unconsumed_tail
            if not pending and len(out) < 1 << 24:
                break
    except zlib.error:
        return  # not deflate data: pydicom's own error becomes the sentence
    if total > INFLATED_LIMIT:
        raise DicomError(
            f"{path}: its deflated data set inflates to over {INFLATED_LIMIT // 1_000_000} MB, more than "
            "any image pneumoscan reads needs."
        )


def _read(path: Path, data: bytes):
    """The data set, checked to be one single-frame image with pixel data."""
    import pydicom

    _check_inflated_size(path, data)
    ds = pydicom.dcmread(io.BytesIO(data), force=path.suffix.lower() in DICOM_SUFFIXES)
    if data[PREAMBLE : PREAMBLE + 4] != b"DICM" and "SOPClassUID" not in ds and "PixelData" not in ds:
        raise DicomError(f"{path}: is not a readable DICOM file (no DICOM preamble, no known attributes).")
    if "PixelData" not in ds:
        kind = _code_string(ds.get("Modality")) or "object"
        raise DicomError(f"{path}: is a DICOM {kind} without pixel data (a report or plan, not an image).")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"{path}: is a multi-frame DICOM image ({frames} frames); give one frame a file.")
    return ds


def _to_8bit(path: Path, ds, pixels: np.ndarray) -> Decoded:
    decoded = Decoded(warnings=_warnings(ds))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples == 3 and pixels.ndim == 3:
        decoded.rgb = _to_rgb8(ds, pixels)
        return decoded
    if samples != 1 or pixels.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        layout = f"{_code_string(photometric)}, {samples} samples"
        raise DicomError(f"{path}: has a pixel layout pneumoscan does not read ({layout}).")
    decoded.luma = window(ds, pixels, path)
    return decoded


# Compressed frames whose own header gives their size, read before they are decoded.
_FRAME_KINDS = {
    "1.2.840.10008.1.2.4.50": "JPEG",
    "1.2.840.10008.1.2.4.51": "JPEG",
    "1.2.840.10008.1.2.4.57": "JPEG",
    "1.2.840.10008.1.2.4.70": "JPEG",
    "1.2.840.10008.1.2.4.90": "JPEG 2000",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}
# `window` looks up about this many pixels at a time (a 4-byte index each).
_BAND_PIXELS = 1 << 22


def _frame_size(ds, syntax: str) -> tuple[int, int] | None:
    """(width, height) from the first frame's JPEG frame header or JPEG 2000 SIZ marker; None for
    other syntaxes or when the frame does not say."""
    if syntax not in _FRAME_KINDS:
        return None
    from pydicom.encaps import generate_frames

    from pneumoscan.file_headers import header_size  # the JPEG frame header, read as for JPEG files

    frame = next(generate_frames(ds.PixelData, number_of_frames=1), b"")
    if frame[:4] == b"\xff\x4f\xff\x51" and len(frame) >= 24:  # J2K codestream: SOC, then SIZ
        width, height, left, top = (int.from_bytes(frame[at : at + 4], "big") for at in (8, 12, 16, 20))
        return width - left, height - top
    return header_size(frame)


def window(ds, pixels: np.ndarray, path: Path | str = "") -> np.ndarray:
    """Stored grayscale values -> 0..255 by the module docstring's rule.

    pydicom's own `apply_modality_lut`, `apply_voi` and `apply_windowing` do the arithmetic (they
    read LUT data of VR US or OW in the file's byte order), once per value the stored bits can
    take: the pixels are then looked up in that table a band of rows at a time, so no float copy
    of every pixel is made whatever the image's size.
    """
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if not 1 <= bits <= 16:
        raise DicomError(f"{path}: has {bits} bits stored; pneumoscan reads 1 to 16.")
    ds.BitsStored, ds.PixelRepresentation = bits, int(signed)  # as the rule reads them, for pydicom
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    table = _levels(ds, np.arange(low, high + 1, dtype=np.int64), path)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        table = 255 - table
    out = np.empty(pixels.shape, np.uint8)
    step = max(1, _BAND_PIXELS // max(pixels.shape[1], 1))
    for top in range(0, pixels.shape[0], step):
        index = pixels[top : top + step].astype(np.int32) - low
        np.clip(index, 0, len(table) - 1, out=index)  # bits above BitsStored: as the nearest end
        out[top : top + step] = table[index]
    return out


def _levels(ds, stored: np.ndarray, path: Path | str) -> np.ndarray:
    """Each stored value -> its 8-bit level (before MONOCHROME1's inversion)."""
    from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

    _normalise(ds)
    x = apply_modality_lut(stored, ds)
    y_min, y_max = _output_range(ds)
    item = _voi_item(ds, path)
    if item is not None:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        entries = entries or 65536
        # pydicom 3.0 indexes a table of 8-bit entries with 8-bit indices (entry 256 wraps to 0):
        # it is given 16 as the bits, which changes only the type its table is held in.
        item.LUTDescriptor = [entries % 65536, first, max(bits, 16)]
        # PS3.3 C.11.2.1.1: the value to look up is x rounded, clamped to the table's inputs
        lookup = np.clip(np.rint(x), first, first + entries - 1).astype(np.int64)
        fraction = apply_voi(lookup, ds).astype(np.float64) / (2**bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        fraction = (apply_windowing(x, ds) - y_min) / (y_max - y_min)
    else:
        ends = sorted((y_min, y_max))
        fraction = (x - ends[0]) / max(ends[1] - ends[0], 1e-12)
    return np.floor(np.clip(fraction, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _normalise(ds) -> None:
    """The header as the rule reads it, so pydicom's functions follow the rule: a rescale slope of
    0 or none means 1 and no intercept 0; the first window's values only, the width at least 1,
    and a window with an empty or non-numeric value as no window; an unknown VOI LUT Function as
    LINEAR."""
    if not ds.get("ModalityLUTSequence"):
        ds.RescaleSlope = float(ds.get("RescaleSlope", 1) or 1)
        ds.RescaleIntercept = float(ds.get("RescaleIntercept", 0) or 0)
    centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            del ds[keyword]
    if centre is not None and width is not None:
        ds.WindowCenter, ds.WindowWidth = centre, max(width, 1.0)
    if str(ds.get("VOILUTFunction", "LINEAR")).upper() not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        ds.VOILUTFunction = "LINEAR"


def _output_range(ds) -> tuple[float, float]:
    """pydicom's output range of a window (`apply_windowing`'s y_min, y_max): the values the
    stored bits can take through the modality LUT, in the LUT's bits for a modality LUT table."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return low * ds.RescaleSlope + ds.RescaleIntercept, high * ds.RescaleSlope + ds.RescaleIntercept


def _voi_item(ds, path: Path | str):
    """The first VOI LUT item, checked so that pydicom can read it; None when there is none.
    Legacy tables of 8-bit entries packed one a byte are handed over as VR US values."""
    from pydicom.dataelem import DataElement

    if not ds.get("VOILUTSequence"):
        return None
    item = ds.VOILUTSequence[0]
    if item.get("LUTDescriptor") is None or item.get("LUTData") is None:
        return None
    entries, _, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    if bits != 8 and not 10 <= bits <= 16:
        raise DicomError(f"{path}: its VOI LUT has {bits}-bit entries; pneumoscan reads 8 and 10 to 16.")
    element = item["LUTData"]
    if element.VR != "US" and bits == 8 and len(element.value) == entries:
        item["LUTData"] = DataElement(0x00283006, "US", list(element.value))
        element = item["LUTData"]
    values = element.value
    held = (1 if isinstance(values, int) else len(values)) if element.VR == "US" else len(values) // 2
    if held < entries:
        raise DicomError(f"{path}: its VOI LUT holds {held} of the {entries} entries its descriptor says.")
    return item


def _to_rgb8(ds, pixels: np.ndarray) -> np.ndarray:
    """Colour pixels (pydicom hands YBR over as RGB) as 8-bit RGB: wider samples keep their
    high byte, as for 16-bit colour PNGs (in the samples' own type: no wider copy)."""
    rgb = pixels[..., :3]
    if rgb.dtype != np.uint8:
        bits = int(ds.get("BitsStored", 16) or 16)
        rgb = np.clip(rgb >> max(bits - 8, 0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def _first(value) -> float | None:
    """A window attribute's first value (they may be multi-valued); None when it has none."""
    try:
        number = float(value if isinstance(value, float | int | str) else value[0])
    except (TypeError, ValueError, IndexError):
        return None
    return number if np.isfinite(number) else None


def _warnings(ds) -> list[str]:
    """Header facts that say this is not a frontal chest X-ray (no patient data in them)."""
    found = []
    view = _code_string(ds.get("ViewPosition")).upper()
    if view in LATERAL_VIEWS:
        found.append(f"the header says the view is lateral ({view}); the model reads frontal chest X-rays")
    part = _code_string(ds.get("BodyPartExamined")).upper()
    if part and part not in ("CHEST", "THORAX", "LUNG", "CHEST_TO_PELVIS"):
        found.append(f"the header says the body part is {part}, not the chest")
    return found


def _code_string(value) -> str:
    """A code string (VR CS: at most 16 of A-Z, 0-9, space, underscore) as it may be quoted in a
    message; "" for anything else, such as the bytes of a damaged header."""
    text = str(value or "").strip()
    return text if _CODE_STRING.fullmatch(text) else ""
