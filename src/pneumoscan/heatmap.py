"""Where the model looks, defined once (the page's twin is `web/heatmap.js`): the class
activation map of a film over the model's last feature grid, and its peak.

Where the model ends in global average pooling and one dense unit (pneumonet), its logit is the
mean over the last feature grid of each cell's Σ_c w_c F_c, so that grid is the exact map of its
evidence (CAM); other models (the paper's CNN) get Grad-CAM on their last convolution block.
`heatmap_peak` summarises a map as one point: the centre of mass of the cells where the map
(less its minimum) is at least half its maximum, in [0, 1] coordinates of the image (x right,
y down). metadata.json's `heatmap` block (`model.heatmap_spec`) says which layers the page reads
to compute the same map and peak from the same forward pass. `pneumoscan explain` draws them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the type only: heatmap sits below the bundle that carries the model
    from pneumoscan.bundle import Bundle


def grad_cam(bundle: Bundle, x: np.ndarray) -> np.ndarray | None:
    """Grad-CAM on the feature map entering the model's GlobalAveragePooling2D layer.

    Returns:
        float64 (S, S) in [0, 1] (bilinearly upsampled, scaled to its maximum), or None when
        the model has no GlobalAveragePooling2D layer (e.g. the `seed` architecture).
    """
    import keras
    import tensorflow as tf

    image = bundle.check_input(x)
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
    image = bundle.check_input(x)
    runtime = bundle.runtime
    if (
        bundle.metadata.get("heatmap", {}).get("method") == "cam"
        and runtime is not None
        and runtime.has("cam")
    ):
        _, cells = runtime(image[np.newaxis], 1, "cam")  # the flatbuffer's `cam` output (litert.CAM)
        return cells[0].astype(np.float64), "cam"
    import keras
    import tensorflow as tf

    from pneumoscan.model import heatmap_spec

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


# ---- drawing (the page's `heatmapRgba`) ------------------------------------------------------

ALPHA = 0.6  # the overlay's opacity at the map's maximum, as the page draws it


def heatmap_rgba(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    """(height, width, 4) uint8: the map less its minimum, over its maximum, bilinearly stretched
    over the whole image (half-pixel centres, edges held), inferno colours with alpha 0.6 v; the
    same bytes as the page's `heatmapRgba` (web/heatmap.js). A flat map is transparent."""
    grid = np.asarray(grid, np.float64)
    rgba = np.zeros((height, width, 4), np.uint8)
    low, high = float(grid.min()), float(grid.max())
    if not high > low:
        return rgba
    columns, rows = _stretch(width, grid.shape[1]), _stretch(height, grid.shape[0])
    across = grid[:, columns[0]] + columns[2] * (grid[:, columns[1]] - grid[:, columns[0]])
    across = (across - low) / (high - low)  # (grid rows, width)
    top, bottom = across[rows[0]], across[rows[1]]
    values = top + rows[2][:, np.newaxis] * (bottom - top)
    colour = np.floor(values * 255 + 0.5).astype(np.intp)  # Math.round, for values >= 0
    rgba[..., :3] = _inferno()[colour]
    rgba[..., 3] = np.floor(255 * ALPHA * values + 0.5).astype(np.uint8)
    return rgba


def _stretch(size: int, cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each of `size` output pixels: the two cells around its centre and the weight of the
    second (the page's `stretch`)."""
    u = np.clip((np.arange(size) + 0.5) / size * cells - 0.5, 0, cells - 1)
    first = np.minimum(np.floor(u).astype(np.intp), max(cells - 2, 0))
    return first, np.minimum(first + 1, cells - 1), u - first


_INFERNO: list[np.ndarray] = []


def _inferno() -> np.ndarray:
    """matplotlib's inferno colour map, (256, 3) uint8, read from the one table the page carries
    (`INFERNO_HEX` in web/heatmap.js), so Python draws without matplotlib."""
    if not _INFERNO:
        import re
        from pathlib import Path

        source = (Path(__file__).parent / "web" / "heatmap.js").read_text(encoding="utf-8")
        block = re.search(r"const INFERNO_HEX =((?:\s*'[0-9a-f]+'\s*\+?)+);", source)
        hex_digits = "".join(re.findall(r"'([0-9a-f]+)'", block[1]))
        _INFERNO.append(np.frombuffer(bytes.fromhex(hex_digits), np.uint8).reshape(256, 3))
    return _INFERNO[0]
