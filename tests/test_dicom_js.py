"""The page's RLE Lossless decoder (web/dicom.js `decodeRle`, run in Node): DICOM PS3.5 Annex G
on hand tables (literal runs, replicate runs, the -128 no-op, segment order, padding) and on
frames pydicom's encoder wrote. Whole DICOM files through the page's decode step are compared
with Python in tests/test_preprocess_js.py, and in the browser in tests/test_web.py."""

from __future__ import annotations

import base64
import struct

import numpy as np
import pytest

from conftest import needs_node, write_dicom

pytestmark = needs_node


def _frame(*segments: bytes) -> bytes:
    """An RLE frame: the 64-byte header (count, then 15 offsets), then the segments."""
    offsets, at = [], 64
    for segment in segments:
        offsets.append(at)
        at += len(segment)
    header = struct.pack("<16I", len(segments), *offsets, *[0] * (15 - len(segments)))
    return header + b"".join(segments)


def _decode(units, frame: bytes, pixels: int, samples: int = 1, bytes_per_sample: int = 1) -> dict:
    answer = units.call(
        "decodeRle",
        frame=base64.b64encode(frame).decode(),
        pixels=pixels,
        samples=samples,
        bytesPerSample=bytes_per_sample,
    )
    if "native" in answer:
        answer["native"] = list(base64.b64decode(answer["native"]))
    return answer


# name, segments, pixels, samples, bytes per sample, the native bytes (samples interleaved,
# each little endian)
TABLES = [
    ("a literal run: n = 2 copies 3 bytes", [bytes([2, 10, 20, 30])], 3, 1, 1, [10, 20, 30]),
    ("a replicate run: n = -2 repeats 3 times", [bytes([0xFE, 7])], 3, 1, 1, [7, 7, 7]),
    ("-128 is a no-op", [bytes([0x80, 0x00, 5, 0x80])], 1, 1, 1, [5]),
    ("runs mixed", [bytes([1, 1, 2, 0xFD, 9, 0, 4])], 7, 1, 1, [1, 2, 9, 9, 9, 9, 4]),
    ("a padding byte past the end is ignored", [bytes([0, 3, 0])], 1, 1, 1, [3]),
    ("a run longer than the segment needs stops there", [bytes([0xF0, 6])], 4, 1, 1, [6, 6, 6, 6]),
    (
        "16 bits: the high bytes' segment first",
        [bytes([1, 0x01, 0xAB]), bytes([1, 0x02, 0xCD])],
        2,
        1,
        2,
        [0x02, 0x01, 0xCD, 0xAB],
    ),
    (
        "RGB: one segment per sample, interleaved back",
        [bytes([0xFF, 200]), bytes([1, 10, 11]), bytes([0xFF, 0])],
        2,
        3,
        1,
        [200, 10, 0, 200, 11, 0],
    ),
]


@pytest.mark.parametrize("name, segments, pixels, samples, width, native", TABLES, ids=[t[0] for t in TABLES])
def test_rle_tables(page_units, name, segments, pixels, samples, width, native):
    assert _decode(page_units, _frame(*segments), pixels, samples, width) == {"native": native}


# name, frame, pixels, samples, bytes per sample, the error's telling part
BROKEN = [
    ("no header", bytes(10), 1, 1, 1, "no RLE header"),
    ("one segment for 16-bit samples", _frame(bytes([0, 1])), 1, 1, 2, "1 segments, 2 expected"),
    ("a segment cut short", _frame(bytes([1, 5, 6])), 3, 1, 1, "segment 1 holds 2 of 3 bytes"),
    (
        "an offset past the end",
        struct.pack("<16I", 1, 900, *[0] * 14) + bytes(8),
        1,
        1,
        1,
        "segment 1 lies outside the frame",
    ),
]


@pytest.mark.parametrize("name, frame, pixels, samples, width, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_rle_refuses_broken_frames(page_units, name, frame, pixels, samples, width, message):
    answer = _decode(page_units, frame, pixels, samples, width)
    assert message in answer.get("error", ""), answer


@pytest.mark.parametrize("bits", [8, 16])
def test_rle_decodes_what_pydicom_encodes(page_units, tmp_path, bits):
    """Random samples of an odd size, RLE-encoded by pydicom, decode to the same bytes."""
    import pydicom
    from pydicom.encaps import generate_frames

    rng = np.random.default_rng(bits)
    gray = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    gray[10:20] = 128  # long runs beside noise
    path = write_dicom(tmp_path / "rle.dcm", gray, bits=bits, syntax="rle")
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    expected = ds.pixel_array.astype("<u2" if bits == 16 else np.uint8).tobytes()
    assert _decode(page_units, frame, gray.size, 1, bits // 8) == {"native": list(expected)}
