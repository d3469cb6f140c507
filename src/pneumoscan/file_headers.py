"""What an image file's own bytes say before it is decoded: a PNG's or JPEG's stored size (the
size guard runs on it before any pixel is decoded, for JPEG and PNG files and for the JPEG frames
inside DICOM files) and its EXIF orientation (the rule in `preprocess`'s docstring). Bytes in,
numbers out: no decoder, no other module of the package.
"""

from __future__ import annotations

from collections.abc import Iterator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ORIENTATION_TAG = 0x0112


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment before a JPEG's scan data (end exclusive)."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan
            return
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        yield marker, position, end
        position = end


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as stored, from a PNG's IHDR or a JPEG's first frame header, read before
    decoding (as the page's `sniffImage` does); None when the header does not say."""
    if data.startswith(PNG_SIGNATURE) and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(b"\xff\xd8\xff"):
        for marker, start, _ in jpeg_segments(data):
            # Start of frame: SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC).
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and start + 9 <= len(data):
                height, width = data[start + 5 : start + 7], data[start + 7 : start + 9]
                return int.from_bytes(width, "big"), int.from_bytes(height, "big")
    return None


def exif_block(data: bytes) -> bytes | None:
    """The TIFF structure that holds a JPEG's or PNG's EXIF, by the orientation rule: the first
    APP1 `Exif` segment before a JPEG's scan data, the first eXIf chunk of a PNG; else None."""
    if data.startswith(b"\xff\xd8"):
        for marker, start, end in jpeg_segments(data):
            if marker == 0xE1 and data[start + 4 : start + 10] == b"Exif\0\0":
                return data[start + 10 : end]
        return None
    if data.startswith(PNG_SIGNATURE):
        position = 8
        while position + 8 <= len(data):
            length = int.from_bytes(data[position : position + 4], "big")
            kind = data[position + 4 : position + 8]
            if kind == b"eXIf":
                return data[position + 8 : position + 8 + length]
            if kind == b"IEND":
                return None
            position += 12 + length
    return None


def exif_orientation(tiff: bytes | None) -> int:
    """The Orientation tag (1..8) of IFD 0 of an EXIF TIFF structure; 1 when it is absent, not
    one SHORT, out of range, or the structure is malformed. `web/preprocess.js` mirrors it."""
    if tiff is None or len(tiff) < 8 or tiff[:4] not in (b"II*\0", b"MM\0*"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"

    def number(at: int, size: int) -> int:
        return int.from_bytes(tiff[at : at + size], order)

    ifd = number(4, 4)
    if ifd + 2 > len(tiff):
        return 1
    for entry in range(ifd + 2, min(ifd + 2 + 12 * number(ifd, 2), len(tiff) - 11), 12):
        if number(entry, 2) == ORIENTATION_TAG:
            value = number(entry + 8, 2)
            single_short = number(entry + 2, 2) == 3 and number(entry + 4, 4) == 1
            return value if single_short and 1 <= value <= 8 else 1
    return 1
