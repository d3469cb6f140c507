"""Images that are not chest X-rays, made here: `python -m benchmarks.trust.ood_bench` and the tests
of the out-of-distribution flag (`pneumoscan.ood`).

Five kinds, each image drawn from (kind, index, seed) alone with NumPy and Pillow, so the same
call gives the same pixels on every machine and nothing is downloaded. Nothing optional takes
part: text is drawn in Pillow's built-in bitmap font (not FreeType, whose rendering and hinting
vary by build), and the only photograph used is matplotlib's (a runtime dependency), whether
scikit-learn is installed or not.

- `pattern`: checkerboards, stripes, gratings, gradients, noise, flat colours, shapes;
- `document`: bitmap-font text scaled to several sizes, on paper-like backgrounds; tables; code;
- `photo`: crops, turns and grey versions of matplotlib's `grace_hopper.jpg`, and synthetic
  outdoor scenes;
- `microscopy`: H&E-like stained tissue (pink stroma, purple nuclei) and grey cell fields
  (fluorescence, bright field);
- `modality`: CT-like and MR-like slices, ultrasound fans with speckle.

`packaged_images` gives the real images that pinned packages ship (matplotlib's photograph and
MRI slice; scikit-learn's two photographs when it is installed), and `packaged_slices` the real
CT, MR, nuclear medicine and ultrasound slices among pydicom's test files.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from importlib import util
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pneumoscan import perturb

# Pillow's built-in bitmap font (`perturb.glyph`): the same pixels on every build, 11 px tall.
BITMAP_FONT_HEIGHT = 11

KINDS = ("pattern", "document", "photo", "microscopy", "modality")
WORDS = tuple(
    " ".join(
        (
            "the patient was seen in clinic on the day of admission and a chest film was ordered",
            "results table figure method sample mean value protocol report summary page section",
            "invoice total amount date reference number quantity price lorem ipsum dolor sit amet",
        )
    ).split(" ")
)
CODE = (
    "def main(argv):",
    "    for item in items:",
    "        total += item.price * 2",
    "    return {'ok': True, 'n': len(items)}",
    "import numpy as np",
    "class Parser(object):",
    "    if x is None: raise ValueError(x)",
    "// TODO: handle the error case",
    "const result = await fetch(url);",
)


def _rng(kind: str, index: int, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{kind}:{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def _size(rng: np.random.Generator, low: int = 256, high: int = 900) -> tuple[int, int]:
    """(height, width): the longer side in [low, high], aspect between 0.6 and 1.8."""
    long_side = int(rng.integers(low, high))
    aspect = float(rng.uniform(0.6, 1.8))
    if aspect >= 1:
        return max(int(long_side / aspect), 64), long_side
    return long_side, max(int(long_side * aspect), 64)


def _colour(rng: np.random.Generator, grey: bool = False) -> tuple[int, int, int]:
    if grey:
        value = int(rng.integers(0, 256))
        return value, value, value
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Noise in [0, 1] with features about `scale` pixels across (upsampled coarse noise)."""
    coarse = (max(2, int(shape[0] / scale)), max(2, int(shape[1] / scale)))
    small = Image.fromarray((rng.random(coarse) * 255).astype(np.uint8))
    return np.asarray(small.resize(shape[::-1], Image.Resampling.BICUBIC), np.float64) / 255.0


def _text(canvas: Image.Image, xy: tuple[float, float], text: str, size: int, fill) -> None:
    """Draw `text` on `canvas` at `xy`, about `size` pixels tall: the bitmap font's glyphs
    (`perturb.glyph`, as the acquisition markers) scaled by a whole factor, nearest neighbour,
    so no font engine takes part."""
    scale = max(1, round(size / BITMAP_FONT_HEIGHT))
    ink = perturb.glyph(text, crop=False).astype(np.uint8) * 255  # (h, w), the text box
    if not ink.any():
        return
    mask = Image.fromarray(perturb.resize_nearest(ink, ink.shape[0] * scale, ink.shape[1] * scale))
    canvas.paste(Image.new(canvas.mode, mask.size, fill), (int(xy[0]), int(xy[1])), mask)


# --- patterns ---------------------------------------------------------------------------------


def pattern(rng: np.random.Generator) -> np.ndarray:
    height, width = _size(rng)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    grey = bool(rng.random() < 0.5)
    a, b = np.array(_colour(rng, grey), np.float64), np.array(_colour(rng, grey), np.float64)
    period = float(rng.uniform(8, 120))
    angle = float(rng.uniform(0, np.pi))
    u = x * np.cos(angle) + y * np.sin(angle)
    choice = int(rng.integers(0, 7))
    if choice == 0:  # checkerboard
        t = ((x // period + y // period) % 2).astype(np.float64)
    elif choice == 1:  # stripes
        t = (u // period % 2).astype(np.float64)
    elif choice == 2:  # sinusoidal grating
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    elif choice == 3:  # linear or radial gradient
        r = np.hypot(x - width * rng.random(), y - height * rng.random())
        t = r / r.max() if rng.random() < 0.5 else (u - u.min()) / np.ptp(u)
    elif choice == 4:  # white noise
        t = rng.random((height, width))
    elif choice == 5:  # smooth noise
        t = _smooth_noise(rng, (height, width), float(rng.uniform(4, 80)))
    else:  # flat colour
        t = np.zeros((height, width))
    image = (a + t[..., None] * (b - a)).clip(0, 255).astype(np.uint8)
    return _shapes(rng, image, grey) if rng.random() < 0.4 else image


def _shapes(rng: np.random.Generator, image: np.ndarray, grey: bool) -> np.ndarray:
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[:2]
    for _ in range(int(rng.integers(3, 25))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=_colour(rng, grey))
    return np.asarray(canvas)


# --- documents --------------------------------------------------------------------------------


def _paper(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Off-white paper, slightly uneven, a little tinted; or a dark editor background."""
    base = np.array([rng.uniform(225, 255), rng.uniform(220, 252), rng.uniform(205, 250)])
    shade = 1.0 - 0.06 * _smooth_noise(rng, shape, 200.0)[..., None]
    grain = rng.normal(0, rng.uniform(0, 4), shape)[..., None]
    return (base * shade + grain).clip(0, 255).astype(np.uint8)


def _sentence(rng: np.random.Generator, count: int) -> str:
    return " ".join(str(rng.choice(WORDS)) for _ in range(count))


def document(rng: np.random.Generator) -> np.ndarray:
    height, width = _size(rng, 400, 1000)
    choice = int(rng.integers(0, 3))
    dark = choice == 2 and rng.random() < 0.5
    background = np.full((height, width, 3), 30, np.uint8) if dark else _paper(rng, (height, width))
    canvas = Image.fromarray(background)
    size = int(rng.integers(11, 28))
    ink = (220, 220, 220) if dark else _colour(rng, grey=True)[:1] * 3
    ink = ink if dark else tuple(min(v, 90) for v in ink)
    if choice == 0:
        _text_page(rng, canvas, (height, width), size, ink)
    elif choice == 1:
        _table(rng, canvas, (height, width), size, ink)
    else:
        _code(rng, canvas, (height, width), size, dark)
    image = canvas
    if rng.random() < 0.3:  # a scan: slightly turned and soft
        image = image.rotate(float(rng.uniform(-3, 3)), fillcolor=(250, 250, 250)).filter(
            ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0)))
        )
    return np.asarray(image.convert("L") if rng.random() < 0.3 else image)


def _text_page(rng, canvas, shape, size, ink) -> None:
    height, width = shape
    margin = int(width * rng.uniform(0.05, 0.12))
    _text(canvas, (margin, margin), _sentence(rng, 3).title(), int(size * 1.6), ink)
    y = margin + int(size * 3)
    while y < height - margin:
        if rng.random() < 0.1:
            y += size  # paragraph break
        _text(canvas, (margin, y), _sentence(rng, int(rng.integers(4, 14))), size, ink)
        y += int(size * 1.4)


def _table(rng, canvas, shape, size, ink) -> None:
    height, width = shape
    draw = ImageDraw.Draw(canvas)
    rows, columns = int(rng.integers(4, 20)), int(rng.integers(2, 7))
    x0, y0 = int(width * 0.05), int(height * 0.08)
    cell_w, cell_h = (width * 0.9) / columns, min((height * 0.85) / rows, size * 2.2)
    if rng.random() < 0.5:
        draw.rectangle((x0, y0, x0 + width * 0.9, y0 + cell_h), fill=_colour(rng))
    for r in range(rows + 1):
        draw.line((x0, y0 + r * cell_h, x0 + width * 0.9, y0 + r * cell_h), fill=ink, width=1)
        for c in range(columns):
            if r < rows:
                text = str(rng.choice(WORDS)) if r == 0 else f"{rng.uniform(0, 1000):.2f}"
                _text(canvas, (x0 + c * cell_w + 4, y0 + r * cell_h + 3), text, size, ink)
    for c in range(columns + 1):
        draw.line((x0 + c * cell_w, y0, x0 + c * cell_w, y0 + rows * cell_h), fill=ink, width=1)


def _code(rng, canvas, shape, size, dark) -> None:
    height = shape[0]
    palette = [(86, 156, 214), (206, 145, 120), (106, 153, 85), (220, 220, 170), (200, 200, 200)]
    y = int(size * 0.8)
    while y < height - size:
        indent = int(rng.integers(0, 4)) * size * 2
        colour = palette[int(rng.integers(0, len(palette)))]
        colour = colour if dark else tuple(v // 2 for v in colour)
        _text(canvas, (size + indent, y), str(rng.choice(CODE)), size, colour)
        y += int(size * 1.35)


# --- photographs ------------------------------------------------------------------------------


def _package_file(package: str, *parts: str) -> Path | None:
    spec = util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent.joinpath(*parts)
    return path if path.is_file() else None


def grace_hopper() -> Path:
    """matplotlib's photograph (a runtime dependency): the one source of the `photo` kind.

    Raises:
        FileNotFoundError: matplotlib or its sample data is missing.
    """
    path = _package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")
    if path is None:
        raise FileNotFoundError("matplotlib's sample photograph grace_hopper.jpg is missing; run `make venv`")
    return path


def packaged_photographs() -> list[Path]:
    """Real photographs that installed packages ship, for the benchmark's real-image set:
    matplotlib's, and scikit-learn's two (a test dependency) when it is installed. Only
    matplotlib's feeds `generate`, so generated pixels do not depend on scikit-learn."""
    found = [
        _package_file("sklearn", "datasets", "images", "china.jpg"),
        _package_file("sklearn", "datasets", "images", "flower.jpg"),
    ]
    return [grace_hopper(), *(path for path in found if path is not None)]


def packaged_mri() -> np.ndarray | None:
    """matplotlib's sagittal MRI slice of a head (256 x 256, 8 bits in big-endian 16-bit words)."""
    path = _package_file("matplotlib", "mpl-data", "sample_data", "s1045.ima.gz")
    if path is None:
        return None
    return np.frombuffer(gzip.decompress(path.read_bytes()), ">u2").reshape(256, 256).astype(np.uint8)


# Real slices among pydicom's test files (a runtime dependency): CT, MR, nuclear medicine and
# ultrasound, reduced in size by pydicom's authors; one file of each image.
PYDICOM_SLICES = (
    "CT_small.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "MR_small.dcm",
    "examples_overlay.dcm",
    "JPEG2000.dcm",
    "examples_jpeg2k.dcm",
    "examples_rgb_color.dcm",
)


def packaged_slices() -> list[Path]:
    """pydicom's real CT, MR, NM and ultrasound test slices (`PYDICOM_SLICES`), those present."""
    found = [_package_file("pydicom", "data", "test_files", name) for name in PYDICOM_SLICES]
    return [path for path in found if path is not None]


def packaged_images() -> dict[str, np.ndarray]:
    """name -> pixels of each real non-X-ray image an installed package ships."""
    images = {}
    for path in packaged_photographs():
        with Image.open(path) as image:
            images[path.name] = np.asarray(image.convert("RGB"))
    mri = packaged_mri()
    if mri is not None:
        images["s1045_mri.png"] = mri
    return images


def photo(rng: np.random.Generator) -> np.ndarray:
    """A crop of matplotlib's photograph (rescaled, sometimes mirrored or grey), or one time in
    three a synthetic scene."""
    if rng.random() < 0.33:
        return _scene(rng)
    with Image.open(grace_hopper()) as source:
        image = source.convert("RGB")
    width, height = image.size
    crop_w, crop_h = int(width * rng.uniform(0.4, 1.0)), int(height * rng.uniform(0.4, 1.0))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    scale = float(rng.uniform(0.6, 1.6))
    size = (max(64, int(crop_w * scale)), max(64, int(crop_h * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.3:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.4:
        image = image.convert("L")
    return np.asarray(image)


def _scene(rng: np.random.Generator) -> np.ndarray:
    """Sky, a horizon, textured ground and a few objects: the layout of an outdoor photo."""
    height, width = _size(rng)
    y = np.linspace(0, 1, height)[:, None, None]
    sky = np.array(_colour(rng)) * (1 - y) + np.array([240, 240, 255]) * y
    ground = np.array([rng.uniform(40, 140), rng.uniform(60, 160), rng.uniform(20, 90)])
    texture = _smooth_noise(rng, (height, width), float(rng.uniform(3, 30)))[..., None]
    horizon = int(height * rng.uniform(0.3, 0.7))
    image = np.broadcast_to(sky, (height, width, 3)).copy()
    image[horizon:] = ground * (0.6 + 0.8 * texture[horizon:])
    image = _shapes(rng, image.clip(0, 255).astype(np.uint8), grey=False)
    grain = rng.normal(0, 3, image.shape)
    result = (image + grain).clip(0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(result).convert("L")) if rng.random() < 0.3 else result


# --- microscopy -------------------------------------------------------------------------------


def _blobs(rng, shape, count, radius, softness) -> np.ndarray:
    """Sum of `count` elliptical blobs of about `radius` pixels, in [0, 1]."""
    canvas = Image.new("L", shape[::-1], 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(count):
        cx, cy = rng.uniform(0, shape[1]), rng.uniform(0, shape[0])
        rx, ry = radius * rng.uniform(0.6, 1.4), radius * rng.uniform(0.6, 1.4)
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=int(rng.integers(150, 256)))
    blurred = canvas.filter(ImageFilter.GaussianBlur(softness))
    return np.asarray(blurred, np.float64) / 255.0


def microscopy(rng: np.random.Generator) -> np.ndarray:
    height, width = _size(rng, 300, 900)
    shape = (height, width)
    radius = float(rng.uniform(5, 25))
    count = int(height * width / (radius**2 * rng.uniform(6, 30)))
    nuclei = _blobs(rng, shape, count, radius, radius * 0.15)
    choice = int(rng.integers(0, 3))
    if choice == 0:  # H&E: pink eosin stroma, purple haematoxylin nuclei, white gaps
        stroma = _smooth_noise(rng, shape, radius * 1.5)[..., None]
        pink = np.array([rng.uniform(220, 245), rng.uniform(150, 190), rng.uniform(190, 220)])
        purple = np.array([rng.uniform(70, 120), rng.uniform(40, 80), rng.uniform(120, 170)])
        image = pink * (0.85 + 0.25 * stroma)
        gaps = _smooth_noise(rng, shape, radius * 4)[..., None] > 0.8
        image = np.where(gaps, np.array([245.0, 240, 245]), image)
        image = image * (1 - nuclei[..., None]) + purple * nuclei[..., None]
    elif choice == 1:  # fluorescence: bright nuclei on black
        image = (255 * nuclei * rng.uniform(0.6, 1.0) + rng.normal(8, 4, shape))[..., None]
    else:  # bright field / phase: dark-rimmed cells with a halo on grey
        rim = np.abs(np.gradient(nuclei)[0]) + np.abs(np.gradient(nuclei)[1])
        image = (rng.uniform(120, 200) - 600 * rim + 40 * nuclei + rng.normal(0, 5, shape))[..., None]
    image = image.clip(0, 255).astype(np.uint8)
    return image[..., 0] if image.shape[-1] == 1 else image


# --- other modalities -------------------------------------------------------------------------


def _ellipse_mask(shape, centre, radii, angle=0.0) -> np.ndarray:
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    dx, dy = x - centre[0], y - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 <= 1.0


def modality(rng: np.random.Generator) -> np.ndarray:
    side = int(rng.integers(256, 700))
    choice = int(rng.integers(0, 3))
    image = [_ct, _mr, _ultrasound][choice](rng, (side, side if choice != 2 else int(side * 1.3)))
    return image.clip(0, 255).astype(np.uint8)


def _ct(rng, shape) -> np.ndarray:
    """An axial chest or head CT slice in a soft-tissue window: black air, grey tissue, white bone."""
    height, width = shape
    centre, image = (width / 2, height * rng.uniform(0.45, 0.55)), np.zeros(shape)
    if rng.random() < 0.5:  # chest: wide body, dark lungs, spine, ribs
        body = _ellipse_mask(shape, centre, (width * 0.42, height * 0.3))
        image[body] = 110 + 10 * rng.standard_normal(int(body.sum()))
        for side in (-1, 1):
            lung = _ellipse_mask(
                shape, (centre[0] + side * width * 0.17, centre[1]), (width * 0.13, height * 0.2), side * 0.2
            )
            image[lung] = 15 + 8 * rng.random(int(lung.sum()))
        spine = (centre[0], centre[1] + height * 0.2)
        image[_ellipse_mask(shape, spine, (width * 0.04, height * 0.04))] = 240
    else:  # head: skull ring, brain
        skull = _ellipse_mask(shape, centre, (width * 0.36, height * 0.43))
        brain = _ellipse_mask(shape, centre, (width * 0.33, height * 0.40))
        image[skull] = 245
        image[brain] = 100 + 15 * _smooth_noise(rng, shape, 12)[brain]
    table = int(height * 0.85)
    image[table : table + 4, int(width * 0.1) : int(width * 0.9)] = 180  # the couch
    slice_ = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    return np.asarray(slice_.filter(ImageFilter.GaussianBlur(1)))


def _mr(rng, shape) -> np.ndarray:
    """A T1-like head slice: bright fat rim, dark skull, folded grey and white matter."""
    height, width = shape
    centre = (width / 2, height / 2)
    image = np.zeros(shape)
    scalp = _ellipse_mask(shape, centre, (width * 0.38, height * 0.45))
    skull = _ellipse_mask(shape, centre, (width * 0.35, height * 0.42))
    brain = _ellipse_mask(shape, centre, (width * 0.32, height * 0.39))
    image[scalp] = 200
    image[skull] = 30
    folds = _smooth_noise(rng, shape, float(rng.uniform(6, 14)))
    image[brain] = np.where(folds[brain] > 0.5, 170, 110) + 10 * rng.standard_normal(int(brain.sum()))
    ventricles = _ellipse_mask(shape, centre, (width * 0.05, height * 0.12))
    image[ventricles] = 40
    return image + np.abs(rng.normal(0, 6, shape))  # Rician-like background noise


def _ultrasound(rng, shape) -> np.ndarray:
    """A sector scan: a fan of speckle on black, darker cysts, text in a corner."""
    height, width = shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    apex = (width / 2, -height * 0.05)
    radius = np.hypot(x - apex[0], y - apex[1])
    angle = np.arctan2(x - apex[0], y - apex[1])
    half = np.radians(rng.uniform(30, 45))
    fan = (np.abs(angle) < half) & (radius > height * 0.08) & (radius < height * 0.95)
    speckle = rng.rayleigh(1.0, shape) * (0.5 + _smooth_noise(rng, shape, 30))
    image = np.where(fan, 70 * speckle * np.exp(-radius / (height * 1.5)), 0)
    for _ in range(int(rng.integers(0, 4))):
        cyst = _ellipse_mask(shape, (rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.8) * height), (30, 20))
        image[cyst & fan] *= 0.15
    canvas = Image.fromarray(image.clip(0, 255).astype(np.uint8))
    _text(canvas, (8, 8), "5.0MHz  GAIN 60  D 12cm", 14, 220)
    return np.asarray(canvas, np.float64)


GENERATORS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "pattern": pattern,
    "document": document,
    "photo": photo,
    "microscopy": microscopy,
    "modality": modality,
}


def generate(kind: str, index: int, seed: int = 0) -> np.ndarray:
    """Image `index` of `kind`: (H, W) or (H, W, 3) uint8, a function of (kind, index, seed).

    Raises:
        ValueError: an unknown kind.
    """
    if kind not in GENERATORS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}.")
    return GENERATORS[kind](_rng(kind, index, seed))


def write_set(
    out_dir: Path, per_kind: int, seed: int = 0, kinds: tuple[str, ...] = KINDS
) -> dict[str, list[Path]]:
    """Write `per_kind` PNGs of each kind under `out_dir/KIND/`; kind -> the files."""
    written: dict[str, list[Path]] = {}
    for kind in kinds:
        folder = Path(out_dir) / kind
        folder.mkdir(parents=True, exist_ok=True)
        written[kind] = []
        for index in range(per_kind):
            path = folder / f"{kind}-{index:03d}.png"
            Image.fromarray(generate(kind, index, seed)).save(path)
            written[kind].append(path)
    return written
