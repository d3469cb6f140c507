"""Does a prediction hold when the image is moved, cropped or marked? Used by `pneumoscan
explain` (marker sensitivity), tests/test_shipped_model.py and benchmarks/robustness/stability.py.

Each image is predicted together with groups of its copies, in one forward pass:
- framing: `translation_variants` (8 moves of `TRANSLATION_FRACTION` of the side, black fill)
  and `crop_variants` (5 crops resized back to the side);
- markers: `marker_variants` (a bright "R" or "L" on a dark box pasted into each corner, as lead
  markers appear, and corners blacked out).
A model that reads the lungs keeps the largest change of its calibrated probability small.

Everything works on the model's (S, S, 1) float32 input in [0, 255] (`data.scan`,
`preprocess.decode_to_input`); the image operations are `pneumoscan.perturb`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pneumoscan import perturb
from pneumoscan.bundle import Bundle
from pneumoscan.preprocess import resize

# Where L/R markers and text labels sit: a square of this fraction of the side in each corner.
CORNER_FRACTION = 0.15
MARKER_LETTERS = ("R", "L")
MARKER_HEIGHT = 0.08  # letter height, a fraction of S (real markers: 5-10% of the film)
MARKER_MARGIN = 0.02  # gap between the marker box and the image edges
# Small acquisition changes a model should shrug off (training augments with similar ones).
TRANSLATION_FRACTION = 0.04  # in each direction, zero (black) fill
CROP_FRACTION = 0.05  # cut from each side, then resized back to S


def corners(size: int, height: int, width: int, margin: int) -> dict[str, tuple[int, int]]:
    """(top, left) of a height x width box `margin` pixels in from each corner of an S x S image."""
    return {c: perturb.corner_origin((size, size), (height, width), c, margin) for c in perturb.CORNERS}


def marker_stamp(letter: str, size: int) -> np.ndarray:
    """float32 (h, w): the letter at MARKER_HEIGHT * size, white (255) on a black (0) box with a
    margin of a quarter of its height."""
    ink = perturb.glyph(letter)
    height = max(3, round(MARKER_HEIGHT * size))
    width = max(2, round(ink.shape[1] * height / ink.shape[0]))
    letter_ink = perturb.resize_nearest(ink, height, width)
    return np.pad(np.where(letter_ink, 255.0, 0.0), max(1, height // 4)).astype(np.float32)


def marker_variants(x: np.ndarray) -> dict[str, np.ndarray]:
    """Copies of the (S, S, 1) input with a synthetic marker in one corner, or corners blacked out.

    Keys: `"R top-left"` ... `"L bottom-right"` (a letter per `MARKER_LETTERS` and corner),
    `"black top-left"` ... (one corner square set to 0) and `"black corners"` (all four).
    """
    image = np.asarray(x, dtype=np.float32)
    size = image.shape[0]
    margin, corner = round(MARKER_MARGIN * size), max(1, round(CORNER_FRACTION * size))
    variants = {}
    for letter in MARKER_LETTERS:
        stamp = marker_stamp(letter, size)
        opaque = np.ones(stamp.shape, bool)
        for name, (top, left) in corners(size, *stamp.shape, margin).items():
            variants[f"{letter} {name}"] = perturb.stamp(image, opaque, stamp, top, left)
    blacked = image
    for name in perturb.CORNERS:
        variants[f"black {name}"] = perturb.blackout(image, name, corner, corner)
        blacked = perturb.blackout(blacked, name, corner, corner)
    variants["black corners"] = blacked
    return variants


def translation_variants(x: np.ndarray) -> dict[str, np.ndarray]:
    """The (S, S, 1) input moved by `TRANSLATION_FRACTION` of S in 8 directions, black fill."""
    image = np.asarray(x, dtype=np.float32)
    step = max(1, round(TRANSLATION_FRACTION * image.shape[0]))
    return {
        f"shift {dy:+d},{dx:+d}": perturb.translate(image, dy, dx)
        for dy in (-step, 0, step)
        for dx in (-step, 0, step)
        if (dy, dx) != (0, 0)
    }


def crop_variants(x: np.ndarray) -> dict[str, np.ndarray]:
    """Crops resized back to S (bilinear, `preprocess.resize`): `CROP_FRACTION` cut from every
    side ("crop centre"), and twice that from two sides, keeping one corner ("crop top-left"...)."""
    image = np.asarray(x, dtype=np.float32)
    size = image.shape[0]
    cut = max(1, round(CROP_FRACTION * size))
    keep = size - 2 * cut
    boxes = {"crop centre": (cut, cut)}
    boxes.update({f"crop {name}": start for name, start in corners(size, keep, keep, 0).items()})
    return {
        name: resize(image[top : top + keep, left : left + keep], size) for name, (top, left) in boxes.items()
    }


def framing_variants(x: np.ndarray) -> dict[str, np.ndarray]:
    """`translation_variants` and `crop_variants` together: 13 copies."""
    return {**translation_variants(x), **crop_variants(x)}


def with_copies(
    bundle: Bundle, x: np.ndarray, *copies: dict[str, np.ndarray]
) -> tuple[float, list[np.ndarray]]:
    """Calibrated probabilities of the input and of each group of copies, in one forward pass.

    Returns:
        The input's probability, and per group of `copies` (e.g. `translation_variants(x)`) a
        float64 array of its copies' probabilities, in the group's order.
    """
    image = bundle.check_input(x)
    probabilities = bundle.probabilities(np.stack([image, *(v for group in copies for v in group.values())]))
    ends = np.cumsum([len(group) for group in copies])
    return float(probabilities[0]), np.split(probabilities[1:], ends[:-1])


def marker_effects(bundle: Bundle, x: np.ndarray) -> dict[str, float]:
    """Calibrated probability of each `marker_variants` copy minus that of the input."""
    variants = marker_variants(bundle.check_input(x))
    base, (probabilities,) = with_copies(bundle, x, variants)
    return {name: float(p - base) for name, p in zip(variants, probabilities, strict=True)}


def marker_sensitivity(bundle: Bundle, x: np.ndarray) -> float:
    """Largest |change of calibrated probability| over `marker_variants`: ~0 for a model that
    ignores the corners."""
    return max(abs(delta) for delta in marker_effects(bundle, x).values())


def stability(bundle: Bundle, x: np.ndarray) -> dict[str, float]:
    """Largest |change of calibrated probability| under small translations and crops.

    Returns:
        `{probability, translation, crop, max}`: the input's calibrated probability, the
        largest change over `translation_variants`, over `crop_variants`, and over both.
    """
    image = bundle.check_input(x)
    base, (moved, cropped) = with_copies(bundle, image, translation_variants(image), crop_variants(image))
    translation, crop = float(np.abs(moved - base).max()), float(np.abs(cropped - base).max())
    return {"probability": base, "translation": translation, "crop": crop, "max": max(translation, crop)}


@dataclass
class CopyEffects:
    """Calibrated probabilities of images and of their framing and marker copies.

    Attributes:
        probability: (n,) each image's.
        framing: (n, 13) its `framing_variants`'.
        markers: (n, 13) its `marker_variants`'.
    """

    probability: np.ndarray
    framing: np.ndarray
    markers: np.ndarray

    def largest_change(self, group: str) -> np.ndarray:
        """(n,) per image, the largest |change| over the copies of `group` ("framing", "markers")."""
        return np.abs(getattr(self, group) - self.probability[:, np.newaxis]).max(axis=1)

    def changed_label(self, group: str, threshold: float) -> np.ndarray:
        """(n, copies) True where a copy falls on the other side of `threshold` than its image."""
        return (getattr(self, group) >= threshold) != (self.probability[:, np.newaxis] >= threshold)


def copy_effects(bundle: Bundle, images: Iterable[np.ndarray]) -> CopyEffects:
    """`CopyEffects` of each (S, S, 1) model input, one forward pass per image and its copies."""
    rows = [with_copies(bundle, x, framing_variants(x), marker_variants(x)) for x in images]
    return CopyEffects(
        probability=np.array([base for base, _ in rows]),
        framing=np.array([framing for _, (framing, _) in rows]),
        markers=np.array([markers for _, (_, markers) in rows]),
    )
