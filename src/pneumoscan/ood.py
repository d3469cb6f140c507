"""Is this a chest X-ray at all? The distance maths of the out-of-distribution flag of
`pneumoscan predict`, NumPy only: `fit` makes metadata.json's `ood` block from feature arrays,
`scores` applies it. `pneumoscan.decision` fits it at the end of `pneumoscan train` and in
`pneumoscan ood --model M --data DIR`, and applies it with the rest of the verdict; the model's
feature layer is `decision.feature_source`'s.

Three parts, each 0 for a typical radiograph and 1 at its threshold; the largest is
`ood_score`, and `ood` is `ood_score > 1`:

- `mahalanobis`: the distance of the model's features from the training X-rays' features, as
  probabilistic PCA sees it: exact Mahalanobis distance in the `COMPONENTS` directions of
  largest variance, the rest of the vector measured against the mean variance of the other
  directions (a low-rank whitening: `COMPONENTS` x 320 numbers rather than a 320 x 320 precision
  matrix).
  The features (`decision.feature_source`): where the model ends in global average pooling, each
  channel's mean and standard deviation over the cells of the feature map it pools, of the
  cells' square roots (`MAP_POOLING`, "sqrt_mean_std"; pneumonet's `stage3_out`, 5 x 5 x 160,
  the map the page's heatmap already reads); otherwise the output of the layer feeding the
  output layer (the seed CNN's `dense`). The standard deviations see how the map is spread,
  which the mean cannot; the square root tames the long right tail of the ReLU outputs, so
  the Gaussian fit measures non-X-rays further out (bundles fitted before use "mean_std", the
  plain values, and still read it).
  Mean, directions and variances come from the training split; the threshold is `MARGIN` times
  the (1 − `FALSE_ALARM_RATE`) quantile of the val split's distances, taken as the inverse
  empirical CDF (with fewer than 1,000 val images, the largest distance). The margin is for
  X-rays taken elsewhere. How the features and the two numbers were chosen, and the rates they
  give, are in BENCHMARKS.md, "Trust" (`benchmarks/trust/`).
- `colourfulness` (`preprocess.colourfulness`, of the RGB before luma): radiographs are grey.
- `aspect`: the longer side over the shorter; radiographs come in formats between 1 and 1.33.

The last two thresholds are fixed, not fitted: every training image is a grey 224 x 224 square
(the data's third-party copy), so a quantile of theirs would flag any other format. The formulas
are written into metadata.json's `ood` block (docs/metadata.md), which the web page follows with
the same numbers: float32 arrays are stored as base64 little-endian bytes, read alike by both.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

# MAP_POOLING, COMPONENTS and MARGIN: chosen for the bundled model with
# benchmarks/trust/ood_layers.py and ood_sweep.py (BENCHMARKS.md, "The flag of the shipped model").
MAP_POOLING = "sqrt_mean_std"  # how a feature map that global average pooling reduces is pooled
COMPONENTS = 64  # directions kept exactly; the others share one mean variance
FALSE_ALARM_RATE = 0.001  # of val X-rays flagged by the Mahalanobis part: its quantile
MARGIN = 1.15  # the threshold is this times that quantile, for X-rays from other set-ups
COLOURFULNESS_THRESHOLD = 15.0  # Hasler and Süsstrunk's "slightly colourful"
ASPECT_THRESHOLD = 3.0  # film and detector formats run from 1 (43 x 43 cm) to 1.33 (18 x 24 cm)
RULE = (
    "ood_score = max(d2 / mahalanobis.threshold, colourfulness / colourfulness.threshold, "
    "(aspect - 1) / (aspect.threshold - 1)); ood = ood_score > 1"
)
MAHALANOBIS_FORMULA = (
    "f = the features (feature_pooling); z = f - mean; p = components z (one value per row); "
    "d2 = sum(p_i^2 / variances_i) + max(0, sum(z^2) - sum(p^2)) / residual_variance; float64"
)
POOLING = {
    "mean_std": "feature_layer's output of the same forward pass, (height, width, channels) "
    "float32, per channel over the height x width cells, in float64: f = [the channels' means, "
    "then their population standard deviations]",
    "sqrt_mean_std": "feature_layer's output of the same forward pass, (height, width, channels) "
    "float32, in float64 each cell's value x replaced by sqrt(max(x, 0)), then per channel over "
    "the height x width cells: f = [the channels' means, then their population standard "
    "deviations]",
    "none": "feature_layer's output of the same forward pass, float32, flattened, in float64",
}
COLOURFULNESS_FORMULA = (
    "Hasler and Süsstrunk (2003) on the 8-bit RGB after orientation and to_uint8, before "
    "luma: pixels of every s-th row and column from the first, s = ceil(max(height, width) / "
    "256); rg = R - G, yb = (R + G) / 2 - B; M = sqrt(sd(rg)^2 + sd(yb)^2) + 0.3 * "
    "sqrt(mean(rg)^2 + mean(yb)^2), population standard deviations, float64; 0 for "
    "single-channel images"
)
ASPECT_FORMULA = "max(width, height) / min(width, height) of the decoded image"
COLOURFULNESS_BASIS = (
    "fixed: 'slightly colourful' on Hasler and Süsstrunk's scale; radiographs are grey, "
    "and the training images all score 0, so a quantile of theirs would flag any tint"
)
ASPECT_BASIS = (
    "fixed: film and detector formats run from 1:1 to 4:3; the training images are all "
    "224 x 224 squares (the data's third-party copy), so a quantile of theirs would flag "
    "any other format"
)


def features(layer_output: np.ndarray, pooling: str) -> np.ndarray:
    """The features of `POOLING[pooling]`, float64 (n, d), from the feature layer's output.

    Raises:
        ValueError: an unknown pooling.
    """
    values = np.asarray(layer_output, dtype=np.float32).astype(np.float64)
    if pooling == "none":
        return values.reshape(len(values), -1)
    if pooling not in POOLING:
        raise ValueError(f"unknown feature pooling {pooling!r}; expected one of {sorted(POOLING)}")
    if pooling == "sqrt_mean_std":
        values = np.sqrt(np.maximum(values, 0.0))
    cells = values.reshape(len(values), -1, values.shape[-1])  # (n, height * width, channels)
    return np.concatenate([cells.mean(axis=1), cells.std(axis=1)], axis=1)


def pack(array: np.ndarray) -> dict[str, Any]:
    """A float32 array as metadata.json stores it: shape and little-endian bytes in base64."""
    values = np.ascontiguousarray(array, dtype="<f4")
    return {
        "dtype": "float32",
        "byte_order": "little",
        "shape": list(values.shape),
        "base64": base64.b64encode(values.tobytes()).decode("ascii"),
    }


def unpack(packed: dict[str, Any]) -> np.ndarray:
    """The float64 values of a `pack`ed array."""
    raw = np.frombuffer(base64.b64decode(packed["base64"]), dtype="<f4")
    return raw.reshape(packed["shape"]).astype(np.float64)


def _principal_axes(features: np.ndarray, components: int) -> tuple[np.ndarray, ...]:
    """(mean, unit rows (k, d), their variances (k,), mean variance of the rest) of features
    (n, d), float64; each row's largest entry is positive, so the fit is the same on any BLAS."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    mean = x.mean(axis=0)
    variances, vectors = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    variances, vectors = variances[::-1], vectors[:, ::-1].T  # largest first, one row each
    floor = max(float(variances.sum()), 1e-30) * 1e-12  # dead units: no division by zero
    k = min(components, x.shape[1])
    rows = vectors[:k]
    rows = rows * np.sign(rows[np.arange(k), np.abs(rows).argmax(axis=1)])[:, None]
    rest = variances[k:]
    residual = max(float(rest.mean()), floor) if rest.size else 1.0
    return mean, rows, np.maximum(variances[:k], floor), residual


def fit(
    train_features: np.ndarray,
    val_features: np.ndarray,
    val_checks: np.ndarray,
    source: tuple[str, str],
    components: int = COMPONENTS,
    false_alarm_rate: float = FALSE_ALARM_RATE,
    margin: float = MARGIN,
) -> dict[str, Any]:
    """metadata.json's `ood` block: statistics of the training split's features, the
    Mahalanobis threshold from the val split's, and the rates the val split shows.

    Args:
        train_features, val_features: (n, d) `features` of X-rays.
        val_checks: (n, 2) [colourfulness, aspect] of the val images (`preprocess.Decoded`).
        source: (feature layer name, pooling), as `feature_source` gives them.
        components: directions kept exactly.
        false_alarm_rate: share of val X-rays the Mahalanobis part flags, before the margin.
        margin: the threshold is this times the val quantile (>= 1).

    Raises:
        ValueError: fewer than 2 training or 1 val images, a rate outside (0, 1), or a margin
            under 1.
    """
    if len(train_features) < 2 or len(val_features) < 1:
        raise ValueError("the out-of-distribution fit needs at least 2 training and 1 val image")
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
    if not margin >= 1.0:
        raise ValueError(f"margin must be at least 1, got {margin}")
    mean, rows, variances, residual = _principal_axes(train_features, components)
    mahalanobis = {
        "formula": MAHALANOBIS_FORMULA,
        "mean": pack(mean),
        "components": pack(rows),
        "variances": [float(v) for v in variances],
        "residual_variance": residual,
        "fitted_on": "train",
        "n": len(train_features),
    }
    layer, pooling = source
    block = {
        "feature_layer": layer,
        "feature_pooling": pooling,
        "features": POOLING[pooling],
        "rule": RULE,
        "mahalanobis": mahalanobis,
    }
    distances = squared_distance(block, val_features)
    # The inverse empirical CDF: the smallest val distance with at least 1 - rate of them at or
    # below it, so at most `rate` of val is flagged (all of it the largest, while n < 1 / rate).
    quantile = float(np.quantile(distances, 1.0 - false_alarm_rate, method="inverted_cdf"))
    mahalanobis["threshold"] = margin * quantile
    mahalanobis["margin"] = margin
    mahalanobis["threshold_rule"] = (
        f"{margin:g} x the quantile {1.0 - false_alarm_rate:g} of the val split's d2 (inverse "
        f"empirical CDF: the smallest val d2 with at least {1.0 - false_alarm_rate:.1%} of them "
        "at or below it)"
    )
    checks = np.asarray(val_checks, dtype=np.float64).reshape(-1, 2)
    block["colourfulness"] = _fixed(
        COLOURFULNESS_THRESHOLD, COLOURFULNESS_FORMULA, COLOURFULNESS_BASIS, checks[:, 0]
    )
    block["aspect"] = _fixed(ASPECT_THRESHOLD, ASPECT_FORMULA, ASPECT_BASIS, checks[:, 1])
    flags = scores(block, val_features, checks) > 1.0
    block["false_alarm_rate"] = {
        "chosen": false_alarm_rate,
        "split": "val",
        "n": len(val_features),
        "val": float(flags.mean()),
    }
    return block


def _fixed(threshold: float, formula: str, basis: str, val_values: np.ndarray) -> dict[str, Any]:
    return {
        "formula": formula,
        "threshold": threshold,
        "fitted": False,
        "basis": basis,
        "val_max": float(val_values.max()),
    }


def squared_distance(block: dict[str, Any], features: np.ndarray) -> np.ndarray:
    """The Mahalanobis part's d2, float64 (n,), for `features` (n, d) by the block's formula."""
    part = block["mahalanobis"]
    z = np.asarray(features, dtype=np.float64).reshape(len(features), -1) - unpack(part["mean"])
    # einsum, not a BLAS product: this runs beside TensorFlow on every predict batch, and
    # OpenBLAS's threads, spinning after each call, halved predict's throughput on 2 cores.
    projected = np.einsum("nd,kd->nk", z, unpack(part["components"]))  # (n, k)
    exact = (projected**2 / np.asarray(part["variances"], dtype=np.float64)).sum(axis=1)
    rest = np.maximum(0.0, (z**2).sum(axis=1) - (projected**2).sum(axis=1))
    return exact + rest / float(part["residual_variance"])


def scores(block: dict[str, Any], features: np.ndarray, checks: np.ndarray) -> np.ndarray:
    """`ood_score`, float64 (n,): the largest part over its threshold (`RULE`).

    Args:
        block: metadata.json's `ood` block.
        features: (n, d) `features` of the block's feature layer and pooling.
        checks: (n, 2) [colourfulness, aspect] of the decoded images.
    """
    checks = np.asarray(checks, dtype=np.float64).reshape(-1, 2)
    parts = [
        squared_distance(block, features) / float(block["mahalanobis"]["threshold"]),
        checks[:, 0] / float(block["colourfulness"]["threshold"]),
        (checks[:, 1] - 1.0) / (float(block["aspect"]["threshold"]) - 1.0),
    ]
    return np.max(parts, axis=0)


def sample_checks(samples: Sequence[Any]) -> np.ndarray:
    """(n, 2) [colourfulness, aspect] of `data.Sample`s, as their scan measured them."""
    return np.array([[s.colourfulness, s.aspect] for s in samples], dtype=np.float64).reshape(-1, 2)
