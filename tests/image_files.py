"""Image files Pillow cannot write, byte by byte, for the preprocessing tests: PNGs of any colour
type and bit depth, Adam7-interlaced or not, with every row filter and any extra chunk (eXIf,
text chunks); EXIF blocks with a chosen orientation; JPEGs with XMP packets."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

# PNG colour type -> samples per pixel.
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
XMP_NAMESPACE = b"http://ns.adobe.com/xap/1.0/\x00"


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _row_bytes(samples: np.ndarray, depth: int) -> bytes:
    """(width, channels) samples of one row -> the packed bytes of a PNG row."""
    flat = samples.reshape(-1)
    if depth == 16:
        return flat.astype(">u2").tobytes()
    if depth == 8:
        return flat.astype(np.uint8).tobytes()
    bits = np.unpackbits(flat.astype(np.uint8)[:, None], axis=1)[:, 8 - depth :]  # MSB first
    return np.packbits(bits.reshape(-1)).tobytes()


def _filtered(kind: int, row: np.ndarray, prior: np.ndarray, bpp: int) -> bytes:
    """PNG filter `kind` (0 none, 1 sub, 2 up, 3 average, 4 Paeth) applied to one row's bytes."""
    x, b = row.astype(np.int16), prior.astype(np.int16)
    a = np.concatenate([np.zeros(bpp, np.int16), x[:-bpp]])
    c = np.concatenate([np.zeros(bpp, np.int16), b[:-bpp]])
    if kind == 4:
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        predictor = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    else:
        predictor = [np.zeros_like(x), a, b, (a + b) // 2][kind]
    return bytes([kind]) + ((x - predictor) % 256).astype(np.uint8).tobytes()


def _image_data(samples: np.ndarray, depth: int, channels: int, first_filter: int) -> bytes:
    """The filtered rows of one (sub-)image; the filter type cycles through all five."""
    bpp = max(1, channels * depth // 8)
    rows = [np.frombuffer(_row_bytes(row, depth), np.uint8) for row in samples]
    out = bytearray()
    for y, row in enumerate(rows):
        prior = rows[y - 1] if y else np.zeros_like(row)
        out += _filtered((first_filter + y) % 5, row, prior, bpp)
    return bytes(out)


def png(
    samples: np.ndarray,
    colour_type: int,
    depth: int = 8,
    *,
    palette: np.ndarray | None = None,
    interlace: bool = False,
    before_idat: tuple[bytes, ...] = (),
    after_idat: tuple[bytes, ...] = (),
    first_filter: int = 0,
) -> bytes:
    """A PNG of `samples` ((height, width) or (height, width, channels) of sample values).

    Args:
        palette: (n, 3) uint8 colours for colour type 3.
        before_idat, after_idat: extra chunks (from `chunk`), e.g. eXIf or text chunks.
        first_filter: the filter of the first row; each next row takes the next filter.
    """
    channels = CHANNELS[colour_type]
    samples = samples.reshape(samples.shape[0], samples.shape[1], channels)
    height, width = samples.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, int(interlace))
    data = b""
    for x0, y0, dx, dy in ADAM7 if interlace else [(0, 0, 1, 1)]:
        part = samples[y0::dy, x0::dx]
        if part.size:
            data += _image_data(part, depth, channels, first_filter)
    chunks = [chunk(b"IHDR", header)]
    if palette is not None:
        chunks.append(chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes()))
    chunks += [*before_idat, chunk(b"IDAT", zlib.compress(data, 6)), *after_idat, chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def exif_tiff(orientation: int, byte_order: str = "II", value_type: int = 3, count: int = 1) -> bytes:
    """A TIFF structure (the content of an eXIf chunk, or of an APP1 after `Exif\\0\\0`) whose IFD 0
    holds an ImageDescription entry and then the Orientation tag, as `value_type` x `count`."""
    end = "<" if byte_order == "II" else ">"
    magic = b"II*\x00" if byte_order == "II" else b"MM\x00*"
    description = struct.pack(f"{end}HHI4s", 0x010E, 2, 4, b"cxr\x00")
    if value_type == 3 and count == 1:
        value = struct.pack(f"{end}HH", orientation, 0)
    else:  # LONG, or two SHORTs: not the one SHORT the rule reads
        layout = "I" if value_type == 4 else "HH"
        value = struct.pack(f"{end}{layout}", *((orientation,) if value_type == 4 else (orientation, 1)))
    entry = struct.pack(f"{end}HHI", 0x0112, value_type, count) + value
    return magic + struct.pack(f"{end}IH", 8, 2) + description + entry + struct.pack(f"{end}I", 0)


def exif_chunk(orientation: int, **options) -> bytes:
    return chunk(b"eXIf", exif_tiff(orientation, **options))


def raw_profile_chunk(orientation: int) -> bytes:
    """A tEXt chunk "Raw profile type exif" (ImageMagick's way; Pillow reads it)."""
    data = b"Exif\x00\x00" + exif_tiff(orientation)
    text = f"\nexif\n{len(data):8}\n{data.hex()}\n".encode("latin-1")
    return chunk(b"tEXt", b"Raw profile type exif\x00" + text)


def xmp_packet(orientation: int) -> bytes:
    return (
        b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        b'<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        b'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="%d"/></rdf:RDF></x:xmpmeta>'
        b'<?xpacket end="w"?>' % orientation
    )


def xmp_chunk(orientation: int) -> bytes:
    """An iTXt chunk "XML:com.adobe.xmp", uncompressed."""
    return chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp_packet(orientation))


def app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def jpeg(
    image: Image.Image,
    orientation: int | None = None,
    xmp_orientation: int | None = None,
    quality: int = 95,
) -> bytes:
    """A JPEG of `image` with, optionally, an EXIF orientation (APP1 Exif) and an XMP packet
    with its own tiff:Orientation (APP1 XMP, placed first)."""
    buffer = io.BytesIO()
    options = {"exif": b"Exif\x00\x00" + exif_tiff(orientation)} if orientation is not None else {}
    image.save(buffer, format="JPEG", quality=quality, **options)
    data = buffer.getvalue()
    if xmp_orientation is not None:
        data = data[:2] + app1(XMP_NAMESPACE + xmp_packet(xmp_orientation)) + data[2:]
    return data


def upright(samples: np.ndarray, orientation: int) -> np.ndarray:
    """What an image stored as `samples` looks like once its EXIF orientation is applied."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }[orientation](samples)
