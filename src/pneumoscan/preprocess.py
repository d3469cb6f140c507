"""Decode-to-input, defined once: training, evaluation, `pneumoscan predict` and the tests all
call these functions, and `PREPROCESSING_STEPS` writes the same steps into `metadata.json` for
the browser (`web/preprocess.js`) to repeat.

Steps: decode (JPEG/PNG, EXIF orientation applied) -> 8-bit -> grayscale luma (ITU-R 601,
integer rounding below) -> resize (bilinear, half-pixel centres, no antialias) -> float32 in
[0, 255]. Scaling to [0, 1] and any channel copy happen inside the model. `decode` also keeps
what the out-of-distribution flag (`pneumoscan.ood`) needs from before the luma step: the
colourfulness of the RGB, and the image's aspect.

Orientation follows one rule, read from the file's bytes here and in the page rather than left
to Pillow or the browser (each honours other places, differently): the Orientation tag
(0x0112, one SHORT, 1..8) of IFD 0 of the file's EXIF block, which is the first APP1 `Exif`
segment of a JPEG or the first eXIf chunk of a PNG. XMP `tiff:Orientation` and PNG text chunks
("Raw profile type exif") are ignored; a missing, malformed or out-of-range tag means 1.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, UnidentifiedImageError

from pneumoscan import dicom
from pneumoscan.file_headers import exif_block, exif_orientation, header_size

# Decompression-bomb guard: a clinical radiograph is at most ~4k x 4k (16 MP).
MAX_PIXELS = 50_000_000
# Wide intermediate arrays are made for about this many pixels at a time (`_bands`).
BAND_PIXELS = 1 << 20
# Smaller than this is a thumbnail or an icon, not a radiograph.
MIN_SIDE = 32
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

# `colourfulness` looks at every s-th pixel of every s-th row, s = ceil(longer side / this).
COLOUR_SAMPLE_SIDE = 256
# ITU-R BT.601 luma in 16-bit fixed point: Y = (19595 R + 38470 G + 7471 B + 32768) >> 16,
# i.e. 0.299 R + 0.587 G + 0.114 B rounded half up. Exact in NumPy and in JavaScript.
LUMA_WEIGHTS_Q16 = (19595, 38470, 7471)
# Where the orientation may come from (the module docstring has the rule); metadata.json's
# decode step names them, and a bundle without the key means these two.
ORIENTATION_SOURCES = ["jpeg-app1-exif", "png-exif"]
# EXIF orientation -> the transposition that shows the image upright (as `ImageOps.exif_transpose`).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

PREPROCESSING_STEPS = [
    {
        "op": "decode",
        "formats": ["jpeg", "png", "dicom"],
        "dicom": {
            "files": "*.dcm, *.dicom, or any file whose bytes 128-131 are 'DICM'",
            "window": dicom.WINDOW_RULE,
            "transfer_syntaxes": dicom.TRANSFER_SYNTAXES,
            "refused": "multi-frame images, objects without pixel data, other transfer syntaxes",
            "warnings": "ViewPosition lateral, or BodyPartExamined not the chest",
        },
        "exif_orientation": True,
        "orientation_sources": ORIENTATION_SOURCES,
        "orientation_rule": "tag 0x0112 (one SHORT, 1..8) of IFD 0 in the first APP1 Exif segment "
        "of a JPEG or the first eXIf chunk of a PNG; XMP and PNG text chunks are ignored; "
        "a missing, malformed or out-of-range tag means 1",
        "colour_conversion": "none (embedded ICC profiles are ignored)",
        "max_pixels": MAX_PIXELS,
        "min_side": MIN_SIDE,
    },
    {
        "op": "to_uint8",
        "rule": "16-bit grayscale v -> (v * 255 + 32767) // 65535; 16-bit colour keeps "
        "the high byte; alpha ignored; palette expanded; CMYK converted to RGB",
    },
    {
        "op": "grayscale",
        "standard": "ITU-R BT.601",
        "weights": [0.299, 0.587, 0.114],
        "formula": "(19595*R + 38470*G + 7471*B + 32768) >> 16",
        "note": "single-channel images are used as they are",
    },
    {
        "op": "resize",
        "method": "bilinear",
        "half_pixel_centers": True,
        "align_corners": False,
        "antialias": False,
        "output_dtype": "float32",
        "equivalent": "tf.image.resize(..., 'bilinear') in Python; "
        "tf.image.resizeBilinear(x, [h, w], false, true) in TF.js",
    },
    {
        "op": "model_input",
        "layout": "NHWC",
        "channels": 1,
        "value_range": [0, 255],
        "note": "scaling to [0, 1] and any channel copy are layers of the model",
    },
]


from pneumoscan.errors import ImageError  # noqa: E402  (defined in errors.py since it holds them all)


@dataclass(frozen=True)
class Decoded:
    """One decoded image: its luma, and what the decode saw before the luma step, for the
    out-of-distribution checks (`pneumoscan.ood`)."""

    luma: np.ndarray  # (height, width) uint8, upright
    warnings: list[str] = field(default_factory=list)  # what a DICOM header says against it
    colourfulness: float = 0.0  # `colourfulness` of the RGB before luma; 0 for one channel

    @property
    def aspect(self) -> float:
        """The longer side over the shorter, >= 1 (the same either way up)."""
        height, width = self.luma.shape
        return max(height, width) / min(height, width)


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Süsstrunk's colourfulness M (2003) of (H, W, 3) 8-bit RGB, in float64.

    On the pixels of every s-th row and column from the first, s = ceil(max(H, W) / 256):
    rg = R − G, yb = (R + G) / 2 − B, M = sqrt(sd(rg)² + sd(yb)²) + 0.3 · sqrt(mean(rg)² +
    mean(yb)²), with population standard deviations. 0 for grey pixels (R = G = B); their scale
    puts "slightly colourful" at 15 and "moderately" at 33.
    """
    step = -(-max(rgb.shape[0], rgb.shape[1]) // COLOUR_SAMPLE_SIDE)
    sample = rgb[::step, ::step, :3]
    if np.array_equal(sample[..., 0], sample[..., 1]) and np.array_equal(sample[..., 1], sample[..., 2]):
        return 0.0  # grey, as most radiographs stored in RGB are: the formula gives exactly 0
    red, green, blue = (sample[..., channel].astype(np.float64) for channel in range(3))
    rg, yb = red - green, (red + green) / 2.0 - blue
    spread = np.sqrt(rg.std() ** 2 + yb.std() ** 2)
    return float(spread + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2))


def load_grayscale(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """Decode an image file to a (height, width) uint8 luma array.

    Args:
        path: the file, also used in error messages.
        data: the file's bytes, when already read.

    Raises:
        ImageError: missing, empty, not an image, corrupt, too large or too small.
    """
    return decode(path, data).luma


def load_luma(path: str | Path, data: bytes | None = None) -> tuple[np.ndarray, list[str]]:
    """`load_grayscale`, and the warnings a DICOM header raises (a lateral view, another body
    part), each a phrase to follow the file's name.

    Raises:
        ImageError: as `load_grayscale`.
    """
    decoded = decode(path, data)
    return decoded.luma, decoded.warnings


def decode(path: str | Path, data: bytes | None = None) -> Decoded:
    """`load_luma`, with the colourfulness of the pixels before the luma step.

    Whatever a file holds, the outcome is the image or one `ImageError` sentence naming the
    file: an exception a decoder raises on damaged bytes that no rule below names becomes one
    too (its type named, never its text).

    Raises:
        ImageError: as `load_grayscale`.
    """
    try:
        return _decode(Path(path), data)
    except ImageError:
        raise
    except Exception as error:  # a decoder's surprise on damaged bytes (or MemoryError)
        raise ImageError(unusable(path, error)) from None


def _quotable(error: BaseException) -> str:
    """A decoder's message when it is plain words (Pillow's usually are), else its type: some
    quote the file's bytes (`broken PNG file (chunk b'...')`)."""
    text = str(error)
    plain = text.isascii() and text.isprintable() and "b'" not in text and 'b"' not in text
    return text if plain and 0 < len(text) <= 200 else type(error).__name__


def unusable(path: str | Path, error: BaseException) -> str:
    """The sentence for a file whose decode raised something no rule names."""
    return f"{path}: could not be decoded ({type(error).__name__})."


def _decode(path: Path, data: bytes | None) -> Decoded:
    if data is None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{path}: no such file.") from None
        except IsADirectoryError:
            raise ImageError(f"{path}: is a folder, not an image file.") from None
        except OSError as error:
            raise ImageError(f"{path}: cannot be read ({error.strerror}).") from None
    if not data:
        raise ImageError(f"{path}: the file is empty.")
    if dicom.is_dicom(data, path):
        return _load_dicom(path, data)
    size = header_size(data)
    if size is not None:  # before Pillow, whose own bomb check would say less
        _check_size(path, *size)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("JPEG", "PNG", "MPO"):
                raise ImageError(f"{path}: is a {image.format} image; only JPEG and PNG are supported.")
            _check_size(path, *image.size)
            with _DECODING.hold(image.size[0] * image.size[1]):
                image.load()
                orientation = exif_orientation(exif_block(data))
                if orientation in _UPRIGHT:
                    image = image.transpose(_UPRIGHT[orientation])
                return _to_decoded(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: is not a JPEG, PNG or DICOM image.") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: is over the {MAX_PIXELS // 1_000_000} MP pixel limit.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: is truncated or corrupt ({_quotable(error)}).") from None


class PixelBudget:
    """At most `total` pixels being decoded at once by all threads together (an image larger than
    that alone), so the memory of `predict`'s parallel decodes does not grow with the number of
    cores: each decode holds about 10 bytes a pixel at its peak."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: self.used == 0 or self.used + pixels <= self.total)
            self.used += pixels
        try:
            yield
        finally:
            with self._changed:
                self.used -= pixels
                self._changed.notify_all()


# JPEG and PNG decodes share this; DICOM files are decoded one at a time (`dicom.decode`).
_DECODING = PixelBudget(MAX_PIXELS)


def _load_dicom(path: Path, data: bytes) -> Decoded:
    try:  # the size guard runs on the header's Rows and Columns, before any pixel is decoded
        decoded = dicom.decode(path, data, check_size=lambda width, height: _check_size(path, width, height))
    except dicom.DicomError as error:
        raise ImageError(str(error)) from None
    if decoded.luma is not None:
        return Decoded(decoded.luma, decoded.warnings)
    return Decoded(rgb_to_luma(decoded.rgb), decoded.warnings, colourfulness(decoded.rgb))


def _check_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(f"{path}: {width}x{height} pixels is over the {MAX_PIXELS // 1_000_000} MP limit.")
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"{path}: {width}x{height} pixels is too small to be a chest X-ray "
            f"(at least {MIN_SIDE} px a side)."
        )


def _to_decoded(image: Image.Image) -> Decoded:
    """Luma of a decoded JPEG or PNG, and the colourfulness of its RGB (0 for one channel)."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return Decoded(_bands(np.asarray(image), _wide_to_uint8))
    if mode == "L":
        return Decoded(np.asarray(image, dtype=np.uint8).copy())
    if mode in ("LA", "La"):
        return Decoded(np.asarray(image.getchannel(0), dtype=np.uint8).copy())
    if mode == "F":
        return Decoded(np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8))
    if mode in ("1",):
        return Decoded(np.asarray(image.convert("L"), dtype=np.uint8).copy())
    if mode == "RGB" and image.size[0] * image.size[1] <= BAND_PIXELS:
        # Most radiographs stored in RGB are grey: tested in Pillow's C loops rather than NumPy's,
        # with four 1-byte copies of the image (so only up to a band's pixels; larger ones take
        # the banded luma below).
        red, green, blue = image.split()
        if (
            ImageChops.difference(red, green).getbbox() is None
            and ImageChops.difference(green, blue).getbbox() is None
        ):
            return Decoded(np.asarray(red, dtype=np.uint8).copy())  # its luma and colourfulness (0) exactly
    if mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    rgb = np.asarray(image)[..., :3]
    return Decoded(rgb_to_luma(rgb), [], colourfulness(rgb))


def rgb_to_luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) 8-bit RGB -> (H, W) uint8 luma by `LUMA_WEIGHTS_Q16` (BT.601, rounded half up)."""
    return _bands(rgb, _luma_band)


def _luma_band(band: np.ndarray) -> np.ndarray:
    """One band's luma, a channel at a time in uint32 (NumPy's integer matmul has no BLAS kernel)."""
    weighted = band[..., 0].astype(np.uint32) * np.uint32(LUMA_WEIGHTS_Q16[0])
    weighted += band[..., 1].astype(np.uint32) * np.uint32(LUMA_WEIGHTS_Q16[1])
    weighted += band[..., 2].astype(np.uint32) * np.uint32(LUMA_WEIGHTS_Q16[2])
    weighted += np.uint32(32768)
    return (weighted >> 16).astype(np.uint8)


def _wide_to_uint8(band: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit signed) grey samples -> 8 bits by the `to_uint8` rule."""
    wide = np.clip(band, 0, 65535).astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _bands(pixels: np.ndarray, convert) -> np.ndarray:
    """`convert` applied to a band of rows at a time ((H, W, ...) -> (H, W) uint8), so the wider
    intermediate arrays are never made for the whole image (a 7000 x 7000 RGB image would need
    ~0.8 GB of them at once)."""
    out = np.empty(pixels.shape[:2], np.uint8)
    step = max(1, BAND_PIXELS // max(pixels.shape[1], 1))
    for top in range(0, pixels.shape[0], step):
        out[top : top + step] = convert(pixels[top : top + step])
    return out


def resize(gray, size: int) -> np.ndarray:
    """(height, width) or (height, width, 1) uint8 -> (size, size, 1) float32 in [0, 255].

    Bilinear with half-pixel centres, no antialias: the numbers of `tf.image.resize(...,
    'bilinear', antialias=False)` (TensorFlow's ResizeBilinear kernel, whose float32 steps it
    repeats in the same order) and of the page's `tf.image.resizeBilinear(x, [h, w], false,
    true)`, in NumPy alone, so inference needs no TensorFlow. Only the two source rows and columns
    around each output pixel are read, so a large film costs little more than a small one.
    """
    image = np.asarray(gray)
    if image.ndim == 3:
        image = image[..., 0]
    rows, row_lerp = _taps(image.shape[0], size)
    cols, col_lerp = _taps(image.shape[1], size)
    top = image[rows[0]].astype(np.float32)  # (size, width): the source rows above and below
    bottom = image[rows[1]].astype(np.float32)
    top_left, top_right = top[:, cols[0]], top[:, cols[1]]
    bottom_left, bottom_right = bottom[:, cols[0]], bottom[:, cols[1]]
    upper = top_left + (top_right - top_left) * col_lerp
    lower = bottom_left + (bottom_right - bottom_left) * col_lerp
    out = upper + (lower - upper) * row_lerp[:, np.newaxis]
    return out[..., np.newaxis].astype(np.float32, copy=False)


def _taps(length: int, size: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """((lower, upper) source indices, float32 weight of the upper) for each of `size` outputs
    along an axis of `length` pixels: centre (i + 0.5) * length / size - 0.5, both indices
    clamped to the image, as TensorFlow's `compute_interpolation_weights` computes them."""
    scale = np.float32(length) / np.float32(size)
    centre = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centre)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(centre).astype(np.int64), length - 1)
    return (lower, upper), (centre - floor).astype(np.float32)


def decode_to_input(path: str | Path, size: int) -> np.ndarray:
    """One file -> the model's (size, size, 1) float32 input."""
    return resize(load_grayscale(path), size)
