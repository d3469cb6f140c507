"""`pneumoscan explain [--method cam|occlusion] [--format table|json] [--out DIR] PATH...`: where
does the model look?

Class activation maps (`cam`, the default) come from `pneumoscan.heatmap`, the map and its peak
defined once (the page computes the same from the same forward pass, `web/heatmap.js`).

Occlusion saliency: each patch of the model's input is replaced by the image mean and the drop
in the model's raw output is spread back over the patch (averaged where patches overlap).
`region_shares` then says how much of the positive saliency falls on the corners (where the
burned-in "R"/"L" markers and labels sit), on the border band (collimator edges, film borders)
and on the central lung field. A direct check complements the map: `robustness.marker_sensitivity`
pastes a bright synthetic marker into each corner (and blacks the corners out) and reports the
largest change of the calibrated probability, which a model that reads the lungs keeps small.

Everything works on the model's (S, S, 1) float32 input in [0, 255], as made by
`pneumoscan.preprocess.decode_to_input`, so the maps line up with what the model saw.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pneumoscan.atomic import write_bytes_atomic
from pneumoscan.bundle import Bundle
from pneumoscan.heatmap import class_activation_map, heatmap_peak, heatmap_rgba
from pneumoscan.predict import expand_paths, flag_words, table
from pneumoscan.preprocess import ImageError, load_luma, resize
from pneumoscan.robustness import CORNER_FRACTION, marker_sensitivity

BATCH_SIZE = 64  # occluded copies made at a time
FILLS = ("mean", "zero")  # what an occluded patch is filled with
METHODS = ("cam", "occlusion")
# Regions, as fractions of the side S of the (square) model input. They overlap: a corner
# square (CORNER_FRACTION, where L/R markers and text labels sit) lies partly in the border
# band, so the shares need not add up to 1.
BORDER_FRACTION = 0.10  # width of the outer band: film edges, collimation, rotation gaps
CENTRE_HEIGHT, CENTRE_WIDTH = 0.70, 0.60  # the central field: both lungs and the heart


def occlusion_map(
    bundle: Bundle,
    x: np.ndarray,
    patch: int | None = None,
    stride: int | None = None,
    fill: str = "mean",
) -> np.ndarray:
    """Drop in the model's raw output when each patch is occluded, as an (S, S) map.

    Args:
        bundle: the model (its raw, uncalibrated sigmoid output is used).
        x: one (S, S, 1) input in [0, 255].
        patch: side of the square patch; default S // 8.
        stride: step between patches; default patch // 2. The last row and column of
            patches always reach the image edge, so every pixel is covered.
        fill: "mean" (the image mean, a neutral gray) or "zero" (black).

    Returns:
        float64 (S, S): per pixel, the mean output drop over the patches covering it.
        Positive where the image pushes the output up, negative where it pushes it down.

    Raises:
        ValueError: wrong input shape, patch or stride out of range, or unknown fill.
    """
    image = bundle.check_input(x)
    size = image.shape[0]
    patch = max(1, size // 8) if patch is None else patch
    stride = max(1, patch // 2) if stride is None else stride
    if not 1 <= patch <= size or stride < 1:
        raise ValueError(f"patch must be in [1, {size}] and stride at least 1; got {patch}, {stride}")
    if fill not in FILLS:
        raise ValueError(f"fill {fill!r} is unknown; expected one of {FILLS}")
    value = np.float32(image.mean() if fill == "mean" else 0.0)
    starts = _patch_starts(size, patch, stride)
    covers = np.zeros((len(starts), size), bool)  # covers[i, p]: patch start i covers pixel p
    for i, start in enumerate(starts):
        covers[i, start : start + patch] = True
    rows, cols = np.divmod(np.arange(len(starts) ** 2), len(starts))  # every (row, col) pair
    base = np.float64(bundle.forward(image[np.newaxis])[0])
    drops = np.empty(len(rows))
    for begin in range(0, len(rows), BATCH_SIZE):
        r, c = rows[begin : begin + BATCH_SIZE], cols[begin : begin + BATCH_SIZE]
        masks = covers[r][:, :, np.newaxis] & covers[c][:, np.newaxis, :]  # (batch, S, S)
        copies = np.where(masks[..., np.newaxis], value, image[np.newaxis])  # (batch, S, S, 1)
        drops[begin : begin + len(r)] = base - bundle.forward(copies).astype(np.float64)
    grid = drops.reshape(len(starts), len(starts))
    cover = covers.astype(np.float64)
    total = cover.T @ grid @ cover  # (S, S) sum of drops of the patches over each pixel
    count = np.outer(cover.sum(axis=0), cover.sum(axis=0))
    return total / count


def region_masks(size: int, border: float = BORDER_FRACTION) -> dict[str, np.ndarray]:
    """Boolean (size, size) masks `corner` (four squares), `border` (outer band), `centre`."""
    if not 0.0 <= border < 0.5:
        raise ValueError(f"border must be in [0, 0.5); got {border}")
    corner, band = max(1, round(CORNER_FRACTION * size)), round(border * size)
    masks = {name: np.zeros((size, size), bool) for name in ("corner", "border", "centre")}
    for rows in (slice(0, corner), slice(size - corner, size)):
        for cols in (slice(0, corner), slice(size - corner, size)):
            masks["corner"][rows, cols] = True
    masks["border"][:] = True
    masks["border"][band : size - band, band : size - band] = False
    top, left = round((1 - CENTRE_HEIGHT) / 2 * size), round((1 - CENTRE_WIDTH) / 2 * size)
    masks["centre"][top : size - top, left : size - left] = True
    return masks


def region_shares(saliency: np.ndarray, border: float = BORDER_FRACTION) -> dict[str, float]:
    """Fractions of the positive saliency mass in the corners, the border band and the centre.

    Negative saliency (where occlusion raised the output) is ignored. Regions overlap (see
    `CORNER_FRACTION`), so the shares need not add up to 1.

    Args:
        saliency: a square (S, S) map, e.g. from `occlusion_map` or `grad_cam`.
        border: width of the border band as a fraction of S.

    Returns:
        `{corner_share, border_share, centre_share}`, each in [0, 1]; all 0 when the map
        has no positive value.

    Raises:
        ValueError: the map is not square and 2-D, or holds NaN or infinity.
    """
    values = np.asarray(saliency, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"saliency must be a square (S, S) map; got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("saliency holds NaN or infinite values")
    positive = np.clip(values, 0.0, None)
    total = positive.sum()
    masks = region_masks(values.shape[0], border)
    return {
        f"{name}_share": float(positive[mask].sum() / total) if total > 0 else 0.0
        for name, mask in masks.items()
    }


def explain_files(
    model: str | Path | Bundle | None,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    method: str = "cam",
) -> list[dict]:
    """Heatmaps for files and folders (recursively), one overlay PNG per image.

    Args:
        model: a run folder or bundle, a loaded model, or None for the bundled model.
        paths: image files or folders.
        out_dir: created if needed; receives `<stem>_<method>.png` per image (`<stem>-2_...`
            when two inputs share a stem).
        method: "cam" (class activation map; Grad-CAM for models without one) or "occlusion".

    Returns:
        One record per image, in input order: `{path, probability, label, heatmap_peak,
        heatmap_png, corner_share, border_share, centre_share, marker_sensitivity, png}` (`png`
        is `heatmap_png` under its earlier name) and the flags that go with the label, as
        `predict` gives them: `threshold`, then `borderline` and `ood`, `ood_score` for a
        model with those blocks; plus `warning` (a sentence, as `predict`'s) when a DICOM header
        speaks against the image; or `{path, error}` for a file that cannot be used (the others
        go on). Each overlay is written whole or not at all.

    Raises:
        ValueError: an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    bundle = Bundle.load(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    taken: set[str] = set()
    items = expand_paths(paths)
    flags = _flags(bundle, items)
    for item in items:
        if isinstance(item, dict):
            records.append(item)
            continue
        try:
            shown, warnings = load_luma(item)
        except ImageError as error:
            records.append({"path": str(item), "error": str(error)})
            continue
        png = out / _png_name(item.stem, method, taken)
        record = _explain_one(bundle, shown, item, png, method, flags.get(str(item), {}))
        if warnings:  # what the DICOM header says against the image, as `predict` says it
            record["warning"] = f"{item}: {'; '.join(warnings)}."
        records.append(record)
    return records


def _flags(bundle: Bundle, items: list) -> dict[str, dict]:
    """{path: `{threshold, borderline, ood, ood_score}`} of each file `predict` can read, from
    its verdict (the same decode, colour and shape checks), so that a label here carries the
    flags it carries there."""
    from pneumoscan.predict import verdicts

    paths = [item for item in items if isinstance(item, Path)]
    return {
        path: {k: v for k, v in verdict.record().items() if k not in ("label", "probability")}
        for path, error, _, verdict in verdicts(bundle, paths)
        if not error
    }


def render(records: list[dict]) -> str:
    """Records from `explain_files` as a table for people (shares in percent)."""
    return table(
        records,
        "label      p(pneumonia)  peak (x, y)  centre  border  corners  marker",
        lambda r: (
            f"{r['label']:<10} {r['probability']:>12.4f}  "
            f"({r['heatmap_peak'][0]:.2f}, {r['heatmap_peak'][1]:.2f})  "
            f"{r['centre_share']:>6.0%}  {r['border_share']:>6.0%}  "
            f"{r['corner_share']:>7.0%}  {r['marker_sensitivity']:>6.3f}"
            + "".join(f"  <- {words}" for words in flag_words(r))
        ),
    )


OVERLAY_SIDE = 320  # the overlay's image box, pixels; a title line adds TITLE_LINE above it
TITLE_LINE = 12


def save_overlay(shown: np.ndarray, heatmap: np.ndarray, path: str | Path, title: str = "") -> None:
    """The image as displayed, in gray, fitted into a 320-pixel square, with the map drawn over
    it as the page draws it (`heatmap.heatmap_rgba`: less its minimum, bilinearly stretched over
    the whole image, inferno at alpha 0.6 v); the centre field dashed, the corner squares dotted;
    `title`'s lines above. Pillow only, so `explain` needs nothing of the training install."""
    from PIL import Image, ImageDraw

    gray = np.asarray(shown)
    gray = gray[..., 0] if gray.ndim == 3 else gray
    height, width = gray.shape
    scale = OVERLAY_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    lines = title.split("\n") if title else []
    top = TITLE_LINE * len(lines) + 4 * bool(lines)
    canvas = Image.new("RGB", (OVERLAY_SIDE, top + OVERLAY_SIDE), "white")
    film = Image.fromarray(np.asarray(gray, np.uint8)).resize(size, Image.Resampling.BILINEAR).convert("RGBA")
    film.alpha_composite(Image.fromarray(heatmap_rgba(heatmap, *size), "RGBA"))
    left, upper = (OVERLAY_SIDE - size[0]) // 2, top + (OVERLAY_SIDE - size[1]) // 2
    canvas.paste(film.convert("RGB"), (left, upper))
    draw = ImageDraw.Draw(canvas)
    box_w, box_h = size
    field = ((1 - CENTRE_WIDTH) / 2 * box_w, (1 - CENTRE_HEIGHT) / 2 * box_h)
    _dashed_box(
        draw, left + field[0], upper + field[1], CENTRE_WIDTH * box_w, CENTRE_HEIGHT * box_h, "cyan", 6
    )
    corner_w, corner_h = CORNER_FRACTION * box_w, CORNER_FRACTION * box_h
    for x, y in ((0, 0), (box_w - corner_w, 0), (0, box_h - corner_h), (box_w - corner_w, box_h - corner_h)):
        _dashed_box(draw, left + x, upper + y, corner_w, corner_h, "lime", 2)
    font = _font()
    for k, line in enumerate(lines):
        draw.text((OVERLAY_SIDE / 2, 2 + TITLE_LINE * k), line, fill="black", font=font, anchor="ma")
    png = io.BytesIO()
    canvas.save(png, format="PNG")
    write_bytes_atomic(Path(path), png.getvalue())  # never a half-written overlay at `path`


def _dashed_box(draw, left: float, top: float, width: float, height: float, colour: str, dash: int) -> None:
    """A rectangle's outline in dashes of `dash` pixels (gaps as long)."""
    right, bottom = left + width - 1, top + height - 1
    for (x0, y0), (x1, y1) in (
        ((left, top), (right, top)),
        ((right, top), (right, bottom)),
        ((left, bottom), (right, bottom)),
        ((left, top), (left, bottom)),
    ):
        length = max(abs(x1 - x0), abs(y1 - y0))
        for start in np.arange(0, length, 2 * dash):
            end = min(start + dash, length)
            a, b = start / length if length else 0, end / length if length else 0
            draw.line(
                [(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                fill=colour,
                width=1,
            )


def _font():
    """Pillow's own font at 9 px where it can scale it (FreeType), else its bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=9)
    except (OSError, TypeError, ValueError):
        return ImageFont.load_default()


def _explain_one(
    bundle: Bundle, shown: np.ndarray, path: Path, png: Path, method: str, flags: dict | None = None
) -> dict:
    """One image's record: `shown` is the image as displayed (decoded, oriented, luma); `flags`
    its threshold, borderline and ood fields (`_flags`), added to the record and said in the
    overlay's title."""
    x = resize(shown, bundle.image_size)
    probability = float(bundle.probabilities(x[np.newaxis])[0])
    grid = occlusion_map(bundle, x) if method == "occlusion" else class_activation_map(bundle, x)[0]
    full = _upsample(grid, bundle.image_size)  # on the model input, for the region shares
    shares = region_shares(full)
    label, flags = bundle.label(probability), {"threshold": bundle.threshold, **(flags or {})}
    said = "".join(f"\n{words}" for words in flag_words(flags))  # a line each, as wide as the map
    save_overlay(
        shown,
        grid,
        png,
        title=f"{path.name}\n{label}, p(pneumonia) {probability:.3f}, threshold {flags['threshold']:.3f}"
        f"{said}\n"
        f"{method}: centre box (cyan) {shares['centre_share']:.0%}, "
        f"corners (green) {shares['corner_share']:.0%}",
    )
    return {
        "path": str(path),
        "probability": probability,
        "label": label,
        "heatmap_peak": heatmap_peak(grid),
        "heatmap_png": str(png),
        **shares,
        "marker_sensitivity": marker_sensitivity(bundle, x),
        "png": str(png),
        **flags,
    }


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """An (h, w) map resized (bilinear) to (size, size); an S x S map as it is."""
    if grid.shape == (size, size):
        return grid
    return resize(grid.astype(np.float32), size)[..., 0].astype(np.float64)


def _png_name(stem: str, method: str, taken: set[str]) -> str:
    name, k = stem, 1
    while name in taken:
        k += 1
        name = f"{stem}-{k}"
    taken.add(name)
    return f"{name}_{method}.png"


def _patch_starts(size: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, size - patch + 1, stride))
    return starts if starts[-1] == size - patch else [*starts, size - patch]
