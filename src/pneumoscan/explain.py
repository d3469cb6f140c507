"""`pneumoscan explain [--method cam|occlusion] [--format table|json] [--out DIR] PATH...`: where
does the model look?

Class activation maps (`cam`, the default): where the model ends in global average pooling and
one dense unit (pneumonet), its logit is the mean over the last feature grid of each cell's
Σ_c w_c F_c, so that grid is the exact map of its evidence (CAM); other models (the paper's CNN)
get Grad-CAM on their last convolution block. `heatmap_peak` summarises a map as one point: the
centre of mass of the cells where the map (less its minimum) is at least half its maximum, in
[0, 1] coordinates of the image (x right, y down). The web page computes the same map and peak
from the same forward pass (`heatmap_spec` in metadata.json says how).

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
from pneumoscan.model import heatmap_spec
from pneumoscan.predict import expand_paths, flag_words, table
from pneumoscan.preprocess import ImageError, load_grayscale, resize
from pneumoscan.robustness import CORNER_FRACTION, check_input, marker_sensitivity

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


def class_activation_map(bundle: Bundle, x: np.ndarray) -> tuple[np.ndarray, str]:
    """The model's evidence for PNEUMONIA over its last feature grid, and the method.

    Returns:
        float64 (h, w): exact CAM cells Σ_c w_c F_c (logit units; their mean plus the output
        bias is the logit), or Grad-CAM's ReLU(Σ_c α_c F_c) with α_c the mean gradient of the
        output over the grid; and "cam" or "grad-cam" (see `heatmap_spec`).
    """
    import keras
    import tensorflow as tf

    image = check_input(bundle, x)
    spec = bundle.metadata.get("heatmap") or heatmap_spec(bundle.model)
    features_layer = bundle.model.get_layer(spec["feature_layer"])
    probe = keras.Model(bundle.model.input, [features_layer.output, bundle.model.output])
    if spec["method"] == "cam":
        features, _ = probe(image[np.newaxis], training=False)  # (1, h, w, c)
        kernel = bundle.model.get_layer(spec["weights_layer"]).get_weights()[0][:, 0]  # (c,)
        return np.asarray(features)[0].astype(np.float64) @ kernel.astype(np.float64), "cam"
    with tf.GradientTape() as tape:
        features, output = probe(tf.constant(image[np.newaxis]), training=False)
    gradients = tape.gradient(output, features)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)  # (1, 1, 1, c)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[0]  # (h, w)
    return np.asarray(cam, np.float64), "grad-cam"


def heatmap_peak(grid: np.ndarray) -> list[float]:
    """`[x, y]` in [0, 1]: the centre of mass of the cells where the map less its minimum is at
    least half its maximum, a cell (i, j) of an (h, w) grid sitting at ((j + 0.5)/w, (i + 0.5)/h).
    A flat map gives the centre. The page computes the same (web/heatmap.js)."""
    values = np.asarray(grid, np.float64)
    shifted = values - values.min()
    top = shifted.max()
    if top <= 0:
        return [0.5, 0.5]
    weights = np.where(shifted >= 0.5 * top, shifted, 0.0)
    rows, cols = np.indices(values.shape)
    total = weights.sum()
    x = float(((cols + 0.5) / values.shape[1] * weights).sum() / total)
    y = float(((rows + 0.5) / values.shape[0] * weights).sum() / total)
    return [x, y]


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
        model with those blocks; or `{path, error}` for a file that cannot be used (the others
        go on).

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
            shown = load_grayscale(item)
        except ImageError as error:
            records.append({"path": str(item), "error": str(error)})
            continue
        png = out / _png_name(item.stem, method, taken)
        records.append(_explain_one(bundle, shown, item, png, method, flags.get(str(item), {})))
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


def save_overlay(shown: np.ndarray, heatmap: np.ndarray, path: str | Path, title: str = "") -> None:
    """The image as displayed, in gray, with the map (less its minimum, bilinearly stretched over
    the whole image) as a heat overlay; the centre field dashed, the corner squares dotted.
    Matplotlib's Agg canvas, no pyplot (no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    gray = np.asarray(shown)
    gray = gray[..., 0] if gray.ndim == 3 else gray
    height, width = gray.shape
    lines = title.count("\n") + 1
    inches = 3.2 + 0.12 * lines  # 320 px wide: the image, then 12 px a title line
    figure = Figure(figsize=(3.2, inches), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, 1.0, 3.2 / inches))
    axes.imshow(gray, cmap="gray", vmin=0, vmax=255)
    heat = np.asarray(heatmap, np.float64) - np.min(heatmap)
    if heat.max() > 0:
        heat = heat / heat.max()
        extent = (-0.5, width - 0.5, height - 0.5, -0.5)
        axes.imshow(
            heat,
            cmap="inferno",
            vmin=0.0,
            vmax=1.0,
            alpha=0.6 * heat,
            extent=extent,
            interpolation="bilinear",
        )
    style = {"fill": False, "linewidth": 0.8}
    top, left = (1 - CENTRE_HEIGHT) / 2 * height, (1 - CENTRE_WIDTH) / 2 * width
    axes.add_patch(
        Rectangle(
            (left - 0.5, top - 0.5),
            width - 2 * left,
            height - 2 * top,
            edgecolor="cyan",
            linestyle="--",
            **style,
        )
    )
    corner_h, corner_w = CORNER_FRACTION * height, CORNER_FRACTION * width
    for top, left in (
        (0, 0),
        (0, width - corner_w),
        (height - corner_h, 0),
        (height - corner_h, width - corner_w),
    ):
        axes.add_patch(
            Rectangle((left - 0.5, top - 0.5), corner_w, corner_h, edgecolor="lime", linestyle=":", **style)
        )
    axes.set_axis_off()
    figure.suptitle(title, fontsize=7, y=0.995)
    figure.savefig(path)


def _explain_one(
    bundle: Bundle, shown: np.ndarray, path: Path, png: Path, method: str, flags: dict | None = None
) -> dict:
    """One image's record: `shown` is the image as displayed (decoded, oriented, luma); `flags`
    its threshold, borderline and ood fields (`_flags`), added to the record and said in the
    overlay's title."""
    x = resize(shown, bundle.image_size).numpy()
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
    return resize(grid.astype(np.float32), size).numpy()[..., 0].astype(np.float64)


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
