"""`pneumoscan explain --model MODEL [--out DIR] PATH...`: does the model look at the lungs?

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

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pneumoscan.bundle import Bundle
from pneumoscan.predict import expand_paths, table
from pneumoscan.preprocess import ImageError, decode_to_input
from pneumoscan.robustness import CORNER_FRACTION, check_input, corners, marker_sensitivity

BATCH_SIZE = 64  # occluded copies made at a time
FILLS = ("mean", "zero")  # what an occluded patch is filled with
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
    image = check_input(bundle, x)
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


def grad_cam(bundle: Bundle, x: np.ndarray) -> np.ndarray | None:
    """Grad-CAM on the feature map entering the model's GlobalAveragePooling2D layer.

    Returns:
        float64 (S, S) in [0, 1] (bilinearly upsampled, scaled to its maximum), or None when
        the model has no GlobalAveragePooling2D layer (e.g. the `seed` architecture).
    """
    import keras
    import tensorflow as tf

    image = check_input(bundle, x)
    pools = [layer for layer in bundle.model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    if not pools:
        return None
    probe = keras.Model(bundle.model.inputs, [pools[-1].input, bundle.model.outputs[0]])
    with tf.GradientTape() as tape:
        features, output = probe(tf.constant(image[np.newaxis]), training=False)  # (1, h, w, c)
    gradients = tape.gradient(output, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)  # (1, 1, 1, c)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))[0]  # (h, w, 1)
    size = image.shape[0]
    cam = tf.image.resize(cam, (size, size), method="bilinear").numpy()[..., 0].astype(np.float64)
    peak = cam.max()
    return cam / peak if peak > 0 else cam


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
    model: str | Path | Bundle | None, paths: Sequence[str | Path], out_dir: str | Path
) -> list[dict]:
    """Occlusion maps for files and folders (recursively), one overlay PNG per image.

    Args:
        model: a run folder or bundle, a loaded model, or None for the bundled model.
        paths: image files or folders.
        out_dir: created if needed; receives `<stem>_occlusion.png` per image (`<stem>-2_...`
            when two inputs share a stem).

    Returns:
        One record per image, in input order: `{path, probability, corner_share,
        border_share, centre_share, marker_sensitivity, png}`, or `{path, error}` for a file
        that cannot be used (the others go on).
    """
    bundle = Bundle.load(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    taken: set[str] = set()
    for item in expand_paths(paths):
        if isinstance(item, dict):
            records.append(item)
            continue
        try:
            x = decode_to_input(item, bundle.image_size)
        except ImageError as error:
            records.append({"path": str(item), "error": str(error)})
            continue
        records.append(_explain_one(bundle, x, item, out / _png_name(item.stem, taken)))
    return records


def render(records: list[dict]) -> str:
    """Records from `explain_files` as a table for people (shares in percent)."""
    return table(
        records,
        "p(pneumonia)  centre  border  corners  marker",
        lambda r: (
            f"{r['probability']:>12.4f}  {r['centre_share']:>6.0%}  {r['border_share']:>6.0%}  "
            f"{r['corner_share']:>7.0%}  {r['marker_sensitivity']:>6.3f}"
        ),
    )


def save_overlay(x: np.ndarray, saliency: np.ndarray, path: str | Path, title: str = "") -> None:
    """The input in gray with the positive saliency as a heat overlay; the centre field dashed,
    the corner squares dotted. Matplotlib's Agg canvas, no pyplot (no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    size = saliency.shape[0]
    figure = Figure(figsize=(3.2, 3.55), dpi=100)  # 320 x 355 px: the image and two title lines
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, 1.0, 3.2 / 3.55))
    axes.imshow(np.asarray(x)[..., 0], cmap="gray", vmin=0, vmax=255)
    heat = np.clip(saliency, 0.0, None)
    if heat.max() > 0:
        heat = heat / heat.max()
        axes.imshow(heat, cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.6 * heat)
    top, left = round((1 - CENTRE_HEIGHT) / 2 * size), round((1 - CENTRE_WIDTH) / 2 * size)
    axes.add_patch(
        Rectangle(
            (left - 0.5, top - 0.5),
            size - 2 * left,
            size - 2 * top,
            fill=False,
            edgecolor="cyan",
            linestyle="--",
            linewidth=0.8,
        )
    )
    corner = max(1, round(CORNER_FRACTION * size))
    for top, left in corners(size, corner, corner, 0).values():
        axes.add_patch(
            Rectangle(
                (left - 0.5, top - 0.5),
                corner,
                corner,
                fill=False,
                edgecolor="lime",
                linestyle=":",
                linewidth=0.8,
            )
        )
    axes.set_axis_off()
    figure.suptitle(title, fontsize=7, y=0.995)
    figure.savefig(path)


def _explain_one(bundle: Bundle, x: np.ndarray, path: Path, png: Path) -> dict:
    saliency = occlusion_map(bundle, x)
    probability = float(bundle.probabilities(x[np.newaxis])[0])
    shares = region_shares(saliency)
    save_overlay(
        x,
        saliency,
        png,
        title=f"{path.name}\np(pneumonia) {probability:.3f}, saliency: centre "
        f"{shares['centre_share']:.0%}, corners {shares['corner_share']:.0%}",
    )
    return {
        "path": str(path),
        "probability": probability,
        **shares,
        "marker_sensitivity": marker_sensitivity(bundle, x),
        "png": str(png),
    }


def _png_name(stem: str, taken: set[str]) -> str:
    name, k = stem, 1
    while name in taken:
        k += 1
        name = f"{stem}-{k}"
    taken.add(name)
    return f"{name}_occlusion.png"


def _patch_starts(size: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, size - patch + 1, stride))
    return starts if starts[-1] == size - patch else [*starts, size - patch]
