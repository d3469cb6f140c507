"""pneumoscan.preprocess: every input format to the same luma, and one clear error per bad file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import image_files
from conftest import SAMPLES, synthetic_xray
from image_files import exif_chunk, exif_tiff, raw_profile_chunk, upright, xmp_chunk
from pneumoscan.file_headers import exif_block, exif_orientation
from pneumoscan.preprocess import (
    ImageError,
    colourfulness,
    decode,
    decode_to_input,
    load_grayscale,
    resize,
    rgb_to_luma,
)

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


# The orientation rule (preprocess.py's docstring): EXIF tag 0x0112 in the first APP1 Exif segment
# of a JPEG or the first eXIf chunk of a PNG, nothing else. Pillow's `exif_transpose` also reads
# XMP and PNG text chunks, which the page does not: these files must come out as stored.
ORIENTATION_CASES = [
    ("png eXIf 6", image_files.png(GRAY, 0, before_idat=(exif_chunk(6),)), 6),
    ("png eXIf 8 after IDAT", image_files.png(GRAY, 0, after_idat=(exif_chunk(8),)), 8),
    ("png eXIf big-endian 5", image_files.png(GRAY, 0, before_idat=(exif_chunk(5, byte_order="MM"),)), 5),
    ("png raw-profile text 6", image_files.png(GRAY, 0, before_idat=(raw_profile_chunk(6),)), 1),
    ("png XMP iTXt 3", image_files.png(GRAY, 0, before_idat=(xmp_chunk(3),)), 1),
    (
        "png eXIf 2 beside raw-profile 6",
        image_files.png(GRAY, 0, before_idat=(raw_profile_chunk(6), exif_chunk(2))),
        2,
    ),
    ("png eXIf twice, 7 then 3", image_files.png(GRAY, 0, before_idat=(exif_chunk(7), exif_chunk(3))), 7),
    ("png orientation as LONG", image_files.png(GRAY, 0, before_idat=(exif_chunk(6, value_type=4),)), 1),
    ("png orientation 9", image_files.png(GRAY, 0, before_idat=(exif_chunk(9),)), 1),
    ("png interlaced eXIf 7", image_files.png(GRAY, 0, interlace=True, before_idat=(exif_chunk(7),)), 7),
    ("jpeg XMP only 6", image_files.jpeg(Image.fromarray(GRAY), xmp_orientation=6), 1),
    ("jpeg EXIF 3 and XMP 6", image_files.jpeg(Image.fromarray(GRAY), orientation=3, xmp_orientation=6), 3),
    ("jpeg EXIF 8", image_files.jpeg(Image.fromarray(GRAY), orientation=8), 8),
]


@pytest.mark.parametrize("name, data, orientation", ORIENTATION_CASES, ids=[c[0] for c in ORIENTATION_CASES])
def test_orientation_comes_from_exif_only(name, data, orientation):
    assert exif_orientation(exif_block(data)) == orientation
    # The pixels as stored: metadata does not change how a JPEG's scan decodes.
    stored = load_grayscale("plain.jpeg", image_files.jpeg(Image.fromarray(GRAY))) if "jpeg" in name else GRAY
    np.testing.assert_array_equal(load_grayscale(name, data), upright(stored, orientation))


@pytest.mark.parametrize(
    "tiff",
    [b"", b"II*\x00", b"XX*\x00\x08\x00\x00\x00", exif_tiff(6)[:20], exif_tiff(6)[:-4] + b"\xff" * 40],
    ids=["empty", "header only", "bad magic", "cut in the IFD", "trailing bytes"],
)
def test_malformed_exif_means_orientation_1_or_is_read_where_whole(tiff):
    expected = 6 if tiff.startswith(exif_tiff(6)[:-4]) else 1
    assert exif_orientation(tiff) == expected


@pytest.mark.parametrize(
    "colour_type, depth",
    [(0, 1), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 2), (3, 8), (4, 8), (4, 16), (6, 8), (6, 16)],
)
def test_interlaced_png_decodes_as_the_plain_one(colour_type, depth):
    rng = np.random.default_rng(depth * 10 + colour_type)
    samples = rng.integers(0, 1 << depth, (45, 37, image_files.CHANNELS[colour_type]))
    palette = rng.integers(0, 256, (1 << depth, 3)) if colour_type == 3 else None
    plain, interlaced = (
        image_files.png(samples, colour_type, depth, palette=palette, interlace=interlace)
        for interlace in (False, True)
    )
    np.testing.assert_array_equal(load_grayscale("i.png", interlaced), load_grayscale("p.png", plain))


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


def _huge_header(fmt: str, width: int, height: int) -> bytes:
    """A small image whose header claims `width` x `height` (past Pillow's own bomb limit)."""
    data = bytearray(_encode(Image.fromarray(GRAY), fmt))
    if fmt == "PNG":
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        return bytes(data[:8]) + image_files.chunk(b"IHDR", bytes(data[16:29])) + bytes(data[33:])  # new CRC
    frame = data.index(b"\xff\xc0")
    data[frame + 5 : frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.png", b"", "the file is empty"),
        ("notes.jpeg", b"this is a text file, not an image\n", "is not a JPEG, PNG or DICOM image"),
        ("truncated.png", _encode(Image.fromarray(GRAY), "PNG")[:300], "truncated or corrupt"),
        ("truncated.jpeg", _encode(Image.fromarray(GRAY), "JPEG")[:400], "truncated or corrupt"),
        ("icon.png", _encode(Image.new("L", (16, 16)), "PNG"), "too small to be a chest X-ray"),
        ("bomb.png", _bomb(), "over the 50 MP limit"),
        # The size is read from the header first: the same sentence as the page's, not Pillow's.
        ("huge.png", _huge_header("PNG", 100_000, 100_000), "100000x100000 pixels is over the 50 MP limit"),
        ("huge.jpeg", _huge_header("JPEG", 65_000, 60_000), "65000x60000 pixels is over the 50 MP limit"),
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
    out = resize(np.array([[0, 100], [100, 200]], np.uint8), 4)[..., 0]
    assert out.shape == (4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0, 25, 75, 100])
    np.testing.assert_allclose(out[:, 0], [0, 25, 75, 100])
    np.testing.assert_allclose(out[3, 3], 200)


# (height, width, size): up and down, square, tall, wide, odd, one pixel, a film-sized image.
RESIZE_CASES = [
    (2, 2, 4),
    (1, 1, 5),
    (1, 40, 16),
    (40, 1, 16),
    (7, 7, 7),
    (60, 80, 160),
    (224, 224, 160),
    (33, 500, 160),
    (500, 33, 160),
    (100, 37, 224),
    (999, 1001, 150),
    (1500, 1200, 160),
    (161, 159, 160),
    (320, 320, 160),
    (2000, 1700, 160),
]


@pytest.mark.parametrize(("height", "width", "size"), RESIZE_CASES)
def test_resize_matches_tensorflow(height, width, size):
    # The NumPy resize repeats TensorFlow's ResizeBilinear float32 steps in their order: the same
    # numbers to the bit on this machine; 1e-3 of a grey level is the tolerance allowed.
    import tensorflow as tf

    gray = np.random.default_rng(height * 7919 + width).integers(0, 256, (height, width), dtype=np.uint8)
    ours = resize(gray, size)
    theirs = tf.image.resize(tf.cast(gray[..., None], tf.float32), (size, size), "bilinear", antialias=False)
    assert ours.shape == (size, size, 1) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-3)
    np.testing.assert_array_equal(resize(gray[..., None], size), ours)  # (h, w, 1) reads the same


def test_decode_to_input_shape_and_range():
    x = decode_to_input(next((SAMPLES / "PNEUMONIA").iterdir()), 150)
    assert x.shape == (150, 150, 1) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 255.0 and x.std() > 1


# ---- what the decode measures for the out-of-distribution flag -------------------------------


def _two_halves(left, right, size=(4, 8)) -> np.ndarray:
    rgb = np.zeros((*size, 3), np.uint8)
    rgb[:, : size[1] // 2], rgb[:, size[1] // 2 :] = left, right
    return rgb


@pytest.mark.parametrize(
    "rgb, expected",
    [
        (np.stack([GRAY] * 3, axis=-1), 0.0),  # grey stored as RGB
        (np.full((5, 7, 3), (200, 100, 50), np.uint8), 0.3 * np.hypot(100, 100)),  # one colour
        # rg is 0 and 100, yb 0 and 50: sd 50 and 25, means 50 and 25.
        (_two_halves((0, 0, 0), (200, 100, 100)), np.hypot(50, 25) + 0.3 * np.hypot(50, 25)),
    ],
)
def test_colourfulness_hand_values(rgb, expected):
    assert colourfulness(rgb) == pytest.approx(expected, rel=1e-12)


def test_colourfulness_samples_every_s_th_pixel_of_large_images():
    rgb = np.zeros((300, 520, 3), np.uint8)  # s = ceil(520 / 256) = 3
    rgb[::3, ::3] = (255, 0, 0)  # only the sampled pixels are red
    assert colourfulness(rgb) == pytest.approx(0.3 * np.hypot(255, 127.5))
    rgb[1::3, 1::3] = (0, 0, 255)  # never sampled
    assert colourfulness(rgb) == pytest.approx(0.3 * np.hypot(255, 127.5))


@pytest.mark.parametrize(
    "name, image, colourful, aspect",
    [
        ("grey.png", Image.fromarray(GRAY), False, 80 / 60),
        ("colour.png", Image.fromarray(RGB), True, 80 / 60),
        ("grey-rgb.jpeg", Image.fromarray(np.stack([GRAY] * 3, axis=-1)), False, 80 / 60),
        ("tall.png", Image.fromarray(GRAY.T.copy()), False, 80 / 60),
        ("palette.png", Image.fromarray(RGB).quantize(16), True, 80 / 60),
    ],
)
def test_decode_measures_colour_before_luma_and_the_aspect(name, image, colourful, aspect):
    data = _encode(image, "JPEG" if name.endswith(".jpeg") else "PNG")
    decoded = decode(name, data)
    np.testing.assert_array_equal(decoded.luma, load_grayscale(name, data))
    assert (decoded.colourfulness > 15) == colourful
    assert decoded.aspect == pytest.approx(aspect)
    if name == "colour.png":
        assert decoded.colourfulness == colourfulness(RGB)


def test_any_decoder_exception_is_one_sentence_naming_the_file(tmp_path, monkeypatch):
    """A damaged file can make a decoder raise what no rule names (IndexError, struct.error):
    it is still one ImageError sentence, with the exception's type, not its text."""
    from PIL import Image

    from pneumoscan.preprocess import ImageError, load_grayscale

    path = tmp_path / "odd.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(path)

    def broken(*args, **kwargs):
        raise IndexError("bytes of the file b'\\x00\\x01'")

    monkeypatch.setattr(Image, "open", broken)
    with pytest.raises(ImageError) as raised:
        load_grayscale(path)
    assert str(raised.value) == f"{path}: could not be decoded (IndexError)."


def test_the_pixel_budget_holds_a_decode_back_until_pixels_are_free():
    """Two decodes that together exceed the budget do not run at once; one larger than the
    whole budget runs alone."""
    import threading

    from pneumoscan.preprocess import PixelBudget

    budget, release, entered = PixelBudget(100), threading.Event(), []

    def decode(pixels: int, name: str) -> None:
        with budget.hold(pixels):
            entered.append(name)
            release.wait()

    first = threading.Thread(target=decode, args=(70, "first"))
    first.start()
    while budget.used != 70:
        threading.Event().wait(0.01)
    second = threading.Thread(target=decode, args=(40, "second"))
    second.start()
    second.join(0.3)
    assert entered == ["first"] and budget.used == 70  # 70 + 40 > 100: the second waits
    release.set()
    first.join()
    second.join()
    assert entered == ["first", "second"] and budget.used == 0
    with budget.hold(500):  # alone, a decode larger than the budget still runs
        assert budget.used == 500


LEVELS = np.arange(256, dtype=np.uint8)
# Every red and green level with every fifth blue one (3.4 M colours), as an image of 256 rows.
GREY_RGB = np.repeat(GRAY[..., np.newaxis], 3, axis=2)
MANY_COLOURS = np.stack(np.meshgrid(LEVELS, LEVELS, LEVELS[::5], indexing="ij"), -1).reshape(256, -1, 3)


@pytest.mark.parametrize(
    "rgb",
    [
        pytest.param(MANY_COLOURS, id="3.4 M colours"),
        pytest.param(GREY_RGB, id="grey (the red channel back)"),
        pytest.param(np.concatenate([GREY_RGB, RGB]), id="grey rows over colour rows"),
        pytest.param(RGB[::-1, ::2], id="a strided view"),
        pytest.param(np.zeros((0, 5, 3), np.uint8), id="no rows"),
    ],
)
def test_rgb_to_luma_is_the_rule_exactly(rgb):
    """`rgb_to_luma` (a channel at a time, grey bands passed through) equals the rule in exact
    integer arithmetic, over the range of 8-bit colours and whatever the layout."""
    np.testing.assert_array_equal(rgb_to_luma(rgb), _luma(rgb))


BIG_GREY = np.random.default_rng(5).integers(0, 256, (1030, 1024), dtype=np.uint8)  # > BAND_PIXELS


def _one_pixel_off(rgb: np.ndarray, where: tuple[int, int], channel: int) -> np.ndarray:
    rgb = rgb.copy()
    rgb[where][channel] ^= 1
    return rgb


@pytest.mark.parametrize(
    "rgb",
    [
        pytest.param(GREY_RGB, id="grey"),
        pytest.param(_one_pixel_off(GREY_RGB, (59, 79), 2), id="grey but one blue value, last pixel"),
        pytest.param(_one_pixel_off(GREY_RGB, (0, 0), 1), id="grey but one green value, first pixel"),
        pytest.param(RGB, id="colour"),
        pytest.param(np.repeat(BIG_GREY[..., np.newaxis], 3, axis=2), id="grey, over a band's pixels"),
    ],
)
def test_rgb_images_decode_to_the_rule_whether_grey_or_not(rgb):
    """An RGB PNG's luma and colourfulness are those of its pixels by the NumPy rules, whether
    the decode took its grey shortcut (every R = G = B: the red channel, colourfulness 0) or not."""
    decoded = decode("film.png", _encode(Image.fromarray(rgb), "PNG"))
    np.testing.assert_array_equal(decoded.luma, _luma(rgb))
    assert decoded.colourfulness == colourfulness(rgb)
