"""Pure image operations that imitate acquisition changes: tone, framing, blur, noise, markers.

One library for the robustness checks (`pneumoscan.robustness`: `explain`, the bundled-model
tests, `benchmarks/robustness/stability.py`) and the frozen acquisition-shift benchmark
(`benchmarks/robustness/acquisition_shift.py`). Every function returns a new array and leaves
its input alone. Tone operations take (H, W) uint8; geometric ones take
(H, W) or (H, W, 1) arrays of any dtype. NumPy and Pillow only, so the same input gives the
same bytes on every run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


# ---- tone: one look-up table over the 256 grey levels -------------------------------------


def tone(gray: np.ndarray, curve: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(H, W) uint8 through `curve` (float64 levels 0..255 -> new levels), rounded and clipped."""
    levels = np.arange(256, dtype=np.float64)
    return np.clip(np.rint(curve(levels)), 0, 255).astype(np.uint8)[gray]


def exposure(gray: np.ndarray, gain: float) -> np.ndarray:
    return tone(gray, lambda v: v * gain)


def contrast(gray: np.ndarray, factor: float) -> np.ndarray:
    """Contrast scaled by `factor` around the image's mean."""
    mean = float(gray.mean())
    return tone(gray, lambda v: mean + (v - mean) * factor)


def gamma(gray: np.ndarray, power: float) -> np.ndarray:
    """255 (v / 255) ** power: 0 and 255 stay put."""
    return tone(gray, lambda v: 255.0 * (v / 255.0) ** power)


# ---- framing -------------------------------------------------------------------------------


def window(gray: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The (left, top, right, bottom) box, in sub-pixel coordinates, resized (bilinear) to the
    image's own size: a zoom, or a stretch when the box has another aspect ratio."""
    height, width = gray.shape
    image = Image.fromarray(gray).resize((width, height), Image.Resampling.BILINEAR, box=box)
    return np.asarray(image)


def pad(gray: np.ndarray, axis: int, before: int, after: int, fill: int) -> np.ndarray:
    """`before` and `after` rows (axis 0) or columns (axis 1) of `fill` on either side."""
    widths = [(0, 0), (0, 0)]
    widths[axis] = (before, after)
    return np.pad(gray, widths, constant_values=fill)


def translate(image: np.ndarray, dy: int, dx: int, fill: float = 0) -> np.ndarray:
    """Content moved down by dy and right by dx pixels (negative: up, left) along the first two
    axes; `fill` comes in."""
    height, width = image.shape[:2]
    out = np.full_like(image, fill)
    out[max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def corner_origin(shape: tuple[int, ...], box: tuple[int, int], corner: str, margin: int) -> tuple[int, int]:
    """(top, left) of a (height, width) `box` `margin` pixels in from `corner` of an image of
    `shape`, kept inside the image at the bottom and right."""
    top = margin if corner.startswith("top") else max(0, shape[0] - box[0] - margin)
    left = margin if corner.endswith("left") else max(0, shape[1] - box[1] - margin)
    return top, left


def blackout(image: np.ndarray, corner: str, height: int, width: int) -> np.ndarray:
    """A black (0) `height` x `width` patch in one corner, as when a marker is masked out."""
    top, left = corner_origin(image.shape, (height, width), corner, 0)
    out = image.copy()
    out[top : top + height, left : left + width] = 0
    return out


# ---- detail ---------------------------------------------------------------------------------


def blur(gray: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of radius `sigma` pixels (Pillow)."""
    return np.asarray(Image.fromarray(gray).filter(ImageFilter.GaussianBlur(sigma)))


def noise(gray: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Additive Gaussian noise of `sigma` grey levels, seeded, rounded and clipped."""
    values = np.random.default_rng(seed).normal(0.0, sigma, gray.shape)
    return np.clip(np.rint(gray + values), 0, 255).astype(np.uint8)


def resample(gray: np.ndarray, scale: float, down: str, up: str) -> np.ndarray:
    """Down-sampled by `scale` with `down`, then back up with `up` (`RESAMPLING` names): an
    archive or viewer round trip."""
    height, width = gray.shape
    small = Image.fromarray(gray).resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), RESAMPLING[down]
    )
    return np.asarray(small.resize((width, height), RESAMPLING[up]))


# ---- markers: text in Pillow's built-in bitmap font (no font file) --------------------------


def glyph(text: str, pad: int = 0, crop: bool = True) -> np.ndarray:
    """Boolean (h, w) ink of `text` at the font's own size: cropped to the ink, or with `pad`
    pixels of margin around the text box."""
    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=255, font=font)
    if crop:
        canvas = canvas.crop(canvas.getbbox())
    return np.asarray(canvas) > 127


def resize_nearest(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (bool or uint8) stamp scaled to (height, width) by nearest neighbour: blocky, like a
    scaled-up bitmap font."""
    return np.asarray(Image.fromarray(values).resize((width, height), Image.Resampling.NEAREST))


def stamp(image: np.ndarray, mask: np.ndarray, values: np.ndarray, top: int, left: int) -> np.ndarray:
    """`values` written where `mask` is set, from (top, left); what falls outside is clipped."""
    out = image.copy()
    region = out[top : top + mask.shape[0], left : left + mask.shape[1]]  # a view
    rows, cols = region.shape[:2]
    mask, values = mask[:rows, :cols], values[:rows, :cols].astype(out.dtype)
    if region.ndim == 3:  # (H, W, 1) images take (h, w) stamps
        mask, values = mask[..., np.newaxis], values[..., np.newaxis]
    np.copyto(region, values, where=mask)
    return out
