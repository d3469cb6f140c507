"""Decode-to-input, defined once: training, evaluation, `pneumoscan predict` and the tests all
call these functions, and `PREPROCESSING_STEPS` writes the same steps into `metadata.json` for
the browser (`web/preprocess.js`) to repeat.

Steps: decode (JPEG/PNG, EXIF orientation applied) -> 8-bit -> grayscale luma (ITU-R 601,
integer rounding below) -> resize (bilinear, half-pixel centres, no antialias) -> float32 in
[0, 255]. Scaling to [0, 1] and any channel copy happen inside the model.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression-bomb guard: a clinical radiograph is at most ~4k x 4k (16 MP).
MAX_PIXELS = 50_000_000
# Smaller than this is a thumbnail or an icon, not a radiograph.
MIN_SIDE = 32
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

# ITU-R BT.601 luma in 16-bit fixed point: Y = (19595 R + 38470 G + 7471 B + 32768) >> 16,
# i.e. 0.299 R + 0.587 G + 0.114 B rounded half up. Exact in NumPy and in JavaScript.
LUMA_WEIGHTS_Q16 = (19595, 38470, 7471)

PREPROCESSING_STEPS = [
    {
        "op": "decode",
        "formats": ["jpeg", "png"],
        "exif_orientation": True,
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


class ImageError(ValueError):
    """An input file that cannot be used; the message is one sentence naming the file."""


def load_grayscale(path: str | Path, data: bytes | None = None) -> np.ndarray:
    """Decode an image file to a (height, width) uint8 luma array.

    Args:
        path: the file, also used in error messages.
        data: the file's bytes, when already read.

    Raises:
        ImageError: missing, empty, not an image, corrupt, too large or too small.
    """
    path = Path(path)
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
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ("JPEG", "PNG", "MPO"):
                raise ImageError(f"{path}: is a {image.format} image; only JPEG and PNG are supported.")
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(
                    f"{path}: {width}x{height} pixels is over the {MAX_PIXELS // 1_000_000} MP limit."
                )
            if min(width, height) < MIN_SIDE:
                raise ImageError(
                    f"{path}: {width}x{height} pixels is too small to be a chest X-ray "
                    f"(at least {MIN_SIDE} px a side)."
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_luma(image)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: is not a JPEG or PNG image.") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: is over the {MAX_PIXELS // 1_000_000} MP pixel limit.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{path}: is truncated or corrupt ({error}).") from None


def _to_luma(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.int64)
        return ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("LA", "La"):
        return np.asarray(image.getchannel(0), dtype=np.uint8).copy()
    if mode == "F":
        return np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
    if mode in ("1",):
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    if mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
    rgb = np.asarray(image, dtype=np.uint32)[..., :3]
    weights = np.asarray(LUMA_WEIGHTS_Q16, dtype=np.uint32)
    return ((rgb @ weights + 32768) >> 16).astype(np.uint8)


def resize(gray, size: int):
    """(height, width) or (height, width, 1) uint8 -> (size, size, 1) float32 in [0, 255].

    Works on NumPy arrays and on tensors inside `tf.data` (graph mode).
    """
    import tensorflow as tf

    image = tf.convert_to_tensor(gray)
    if image.shape.rank == 2:
        image = image[..., tf.newaxis]
    image = tf.cast(image, tf.float32)
    return tf.image.resize(image, (size, size), method="bilinear", antialias=False)


def decode_to_input(path: str | Path, size: int) -> np.ndarray:
    """One file -> the model's (size, size, 1) float32 input."""
    return resize(load_grayscale(path), size).numpy()
