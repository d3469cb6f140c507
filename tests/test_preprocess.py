"""pneumoscan.preprocess: every input format to the same luma, and one clear error per bad file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLES, synthetic_xray
from pneumoscan.preprocess import ImageError, decode_to_input, load_grayscale, resize

GRAY = synthetic_xray(1, 1, size=(80, 60))  # (60, 80)
RGB = np.stack([GRAY, np.roll(GRAY, 3, axis=1), 255 - GRAY], axis=-1)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Reference: 0.299 R + 0.587 G + 0.114 B rounded half up, in exact rational arithmetic."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((19595 * r + 38470 * g + 7471 * b + 32768) // 65536).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _exif_rotated(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(GRAY), "PNG", exif=exif.tobytes())


@pytest.mark.parametrize(
    "name, data, expected",
    [
        ("gray.png", _encode(Image.fromarray(GRAY), "PNG"), GRAY),
        ("rgb.png", _encode(Image.fromarray(RGB), "PNG"), _luma(RGB)),
        (
            "rgba.png",
            _encode(Image.fromarray(np.dstack([RGB, np.full(GRAY.shape, 7, np.uint8)])), "PNG"),
            _luma(RGB),
        ),
        ("gray16.png", _encode(Image.fromarray(GRAY.astype(np.uint16) * 257), "PNG"), GRAY),
        (
            "palette.png",
            _encode(Image.fromarray(RGB).quantize(64), "PNG"),
            _luma(np.asarray(Image.fromarray(RGB).quantize(64).convert("RGB"))),
        ),
        ("rot90.png", _exif_rotated(6), np.rot90(GRAY, k=-1)),  # 6 = rotate 90 clockwise to view
        ("rot180.png", _exif_rotated(3), np.rot90(GRAY, k=2)),
    ],
)
def test_lossless_formats_decode_exactly(name, data, expected):
    out = load_grayscale(name, data)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_modes_decode_close_to_the_source(mode):
    image = Image.fromarray(RGB).convert(mode) if mode != "L" else Image.fromarray(GRAY)
    expected = GRAY if mode == "L" else _luma(RGB)
    out = load_grayscale(f"x.{mode}.jpeg", _encode(image, "JPEG", quality=98))
    assert out.shape == GRAY.shape
    assert np.abs(out.astype(int) - expected).mean() < 4


def test_real_sample_is_224_square_luma():
    path = next((SAMPLES / "NORMAL").iterdir())
    out = load_grayscale(path)
    assert out.shape == (224, 224) and out.dtype == np.uint8 and 0 < out.mean() < 255


def _bomb() -> bytes:
    return _encode(Image.new("L", (8000, 7000)), "PNG")


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.png", b"", "the file is empty"),
        ("notes.jpeg", b"this is a text file, not an image\n", "is not a JPEG or PNG image"),
        ("truncated.png", _encode(Image.fromarray(GRAY), "PNG")[:300], "truncated or corrupt"),
        ("truncated.jpeg", _encode(Image.fromarray(GRAY), "JPEG")[:400], "truncated or corrupt"),
        ("icon.png", _encode(Image.new("L", (16, 16)), "PNG"), "too small to be a chest X-ray"),
        ("bomb.png", _bomb(), "over the 50 MP limit"),
        ("pic.gif", _encode(Image.fromarray(GRAY), "GIF"), "only JPEG and PNG are supported"),
    ],
)
def test_bad_files_get_one_sentence_naming_them(name, data, message):
    with pytest.raises(ImageError, match=message) as info:
        load_grayscale(name, data)
    text = str(info.value)
    assert text.startswith(name) and text.endswith(".") and "\n" not in text


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_grayscale(tmp_path / "nope.png")


def test_resize_is_bilinear_with_half_pixel_centres():
    # A 2x2 image upsampled to 4x4 with half-pixel centres: edges clamp, inner pixels interpolate.
    out = resize(np.array([[0, 100], [100, 200]], np.uint8), 4).numpy()[..., 0]
    assert out.shape == (4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0, 25, 75, 100])
    np.testing.assert_allclose(out[:, 0], [0, 25, 75, 100])
    np.testing.assert_allclose(out[3, 3], 200)


def test_decode_to_input_shape_and_range():
    x = decode_to_input(next((SAMPLES / "PNEUMONIA").iterdir()), 150)
    assert x.shape == (150, 150, 1) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 255.0 and x.std() > 1
