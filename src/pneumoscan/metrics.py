"""Clinical test metrics for `pneumoscan evaluate`: plain NumPy functions, no framework.

Labels are 0/1 with 1 = PNEUMONIA (the positive class); `y_prob` is the calibrated
probability of PNEUMONIA and a case is called positive when `y_prob >= threshold`.
A metric that is undefined for its input (one class only, a zero denominator) returns NaN
and warns with `UndefinedMetricWarning`; badly shaped input raises `ValueError`.
`bootstrap_ci` resamples patients, not images, so images of one patient stay together.
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import Any

import numpy as np

# The metrics `bootstrap_ci` gives intervals for, in report order.
CI_METRICS = (
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "balanced_accuracy",
    "roc_auc",
    "pr_auc",
)

# Why each count-based metric can be undefined; quoted in its warning.
_UNDEFINED_BECAUSE = {
    "sensitivity": "y_true has no positive (PNEUMONIA) cases",
    "specificity": "y_true has no negative (NORMAL) cases",
    "precision": "no case is predicted positive (PNEUMONIA)",
    "npv": "no case is predicted negative (NORMAL)",
    "f1": "y_true has no positive (PNEUMONIA) cases and none is predicted",
    "balanced_accuracy": "y_true holds only one class",
}


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the given input and NaN was returned."""


def _undefined(metric: str, reason: str, stacklevel: int = 4) -> float:
    # stacklevel 4 points at the caller of the public metric (public -> helper -> here).
    message = f"{metric} is undefined: {reason}; returning nan"
    warnings.warn(message, UndefinedMetricWarning, stacklevel=stacklevel)
    return float("nan")


# ---------------------------------------------------------------- input checks


def _as_1d(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} has shape {array.shape}; expected a 1-D array")
    if array.size == 0:
        raise ValueError(f"{name} has shape {array.shape}; expected at least one value")
    return array


def _labels(values: Any, name: str = "y_true") -> np.ndarray:
    array = _as_1d(values, name)
    numeric = array.dtype.kind in "biuf"
    if not numeric or not np.isin(array, (0, 1)).all():
        bad = array[~np.isin(array, (0, 1))] if numeric else array
        found = bad[:3].tolist()
        raise ValueError(f"{name} must hold only 0 (NORMAL) and 1 (PNEUMONIA); found {found}")
    return array.astype(np.int64)


def _probabilities(values: Any, name: str = "y_prob") -> np.ndarray:
    array = _as_1d(values, name)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric probabilities; got dtype {array.dtype}")
    array = array.astype(np.float64)
    outside = ~((array >= 0.0) & (array <= 1.0))  # also catches NaN
    if outside.any():
        raise ValueError(f"{name} must lie in [0, 1]; found {array[outside][:3].tolist()}")
    return array


def _same_length(first: np.ndarray, first_name: str, second: np.ndarray, second_name: str) -> None:
    if first.shape != second.shape:
        raise ValueError(
            f"{first_name} has shape {first.shape} but {second_name} has shape {second.shape}; "
            "expected equal lengths"
        )


def paired_inputs(y_true: Any, y_prob: Any, prob_name: str = "y_prob") -> tuple[np.ndarray, np.ndarray]:
    """Validated (labels, probabilities) of equal length."""
    labels, probs = _labels(y_true), _probabilities(y_prob, prob_name)
    _same_length(labels, "y_true", probs, prob_name)
    return labels, probs


def _threshold(threshold: float) -> float:
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1]; got {threshold!r}")
    return value


# ---------------------------------------------------------------- count-based metrics


def confusion_matrix(y_true: Any, y_pred: Any) -> dict[str, int]:
    """Counts of the four outcomes.

    Returns:
        `{"tn", "fp", "fn", "tp"}` as Python ints.
    """
    truth, pred = _labels(y_true), _labels(y_pred, "y_pred")
    _same_length(truth, "y_true", pred, "y_pred")
    tp = int(np.sum(truth & pred))
    fp = int(np.sum(pred)) - tp
    fn = int(np.sum(truth)) - tp
    return {"tn": truth.size - tp - fp - fn, "fp": fp, "fn": fn, "tp": tp}


def _rates(tn: Any, fp: Any, fn: Any, tp: Any) -> dict[str, np.ndarray]:
    """Every count-based metric, elementwise over (possibly weighted) counts; NaN if undefined."""
    tn, fp, fn, tp = (np.asarray(count, dtype=np.float64) for count in (tn, fp, fn, tp))

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / den, np.nan)

    sens, spec = ratio(tp, tp + fn), ratio(tn, tn + fp)
    return {
        "accuracy": ratio(tp + tn, tp + tn + fp + fn),
        "sensitivity": sens,
        "specificity": spec,
        "precision": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (sens + spec) / 2,
    }


def _count_metric(metric: str, y_true: Any, y_pred: Any) -> float:
    value = float(_rates(**confusion_matrix(y_true, y_pred))[metric])
    return _undefined(metric, _UNDEFINED_BECAUSE[metric]) if math.isnan(value) else value


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of cases called correctly."""
    return _count_metric("accuracy", y_true, y_pred)


def sensitivity(y_true: Any, y_pred: Any) -> float:
    """Recall, true-positive rate: TP / (TP + FN). NaN if y_true has no PNEUMONIA case."""
    return _count_metric("sensitivity", y_true, y_pred)


def specificity(y_true: Any, y_pred: Any) -> float:
    """True-negative rate: TN / (TN + FP). NaN if y_true has no NORMAL case."""
    return _count_metric("specificity", y_true, y_pred)


def precision(y_true: Any, y_pred: Any) -> float:
    """Positive predictive value: TP / (TP + FP). NaN if nothing is called positive."""
    return _count_metric("precision", y_true, y_pred)


ppv = precision


def npv(y_true: Any, y_pred: Any) -> float:
    """Negative predictive value: TN / (TN + FN). NaN if nothing is called negative."""
    return _count_metric("npv", y_true, y_pred)


def f1(y_true: Any, y_pred: Any) -> float:
    """Harmonic mean of precision and sensitivity: 2TP / (2TP + FP + FN)."""
    return _count_metric("f1", y_true, y_pred)


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Mean of sensitivity and specificity. NaN if y_true holds one class only."""
    return _count_metric("balanced_accuracy", y_true, y_pred)


# ---------------------------------------------------------------- ranking metrics


def _level_weights(
    labels: np.ndarray, probs: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight at each distinct score, scores ascending.

    Args:
        weights: (resamples, n) multiplicity of each case; a row of ones is the data itself.

    Returns:
        Two (resamples, distinct scores) arrays.
    """
    order = np.argsort(probs, kind="stable")
    sorted_probs = probs[order]
    starts = np.flatnonzero(np.r_[True, sorted_probs[1:] != sorted_probs[:-1]])
    ordered = weights[:, order]
    positive = labels[order].astype(bool)
    return (
        np.add.reduceat(np.where(positive, ordered, 0.0), starts, axis=1),
        np.add.reduceat(np.where(positive, 0.0, ordered), starts, axis=1),
    )


def _auc_from_levels(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney U / (n_pos n_neg) with midranks: a tied positive-negative pair counts 1/2."""
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    negatives_below = np.cumsum(neg, axis=1) - neg
    wins = np.sum(pos * (negatives_below + 0.5 * neg), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg), np.nan)


def _ap_from_levels(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Average precision as sklearn defines it: sum over thresholds of ΔRecall · Precision."""
    pos_desc, neg_desc = pos[:, ::-1], neg[:, ::-1]
    tp, fp = np.cumsum(pos_desc, axis=1), np.cumsum(neg_desc, axis=1)
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_at = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = np.sum(pos_desc * precision_at, axis=1) / n_pos
    return np.where((n_pos > 0) & (n_neg > 0), ap, np.nan)


def _ranking_metric(metric: str, y_true: Any, y_prob: Any) -> float:
    labels, probs = paired_inputs(y_true, y_prob)
    if labels.min() == labels.max():
        return _undefined(metric, "y_true holds only one class")
    pos, neg = _level_weights(labels, probs, np.ones((1, labels.size)))
    curve = _auc_from_levels if metric == "roc_auc" else _ap_from_levels
    return float(curve(pos, neg)[0])


def roc_auc(y_true: Any, y_prob: Any) -> float:
    """Area under the ROC curve; ties between a positive and a negative count one half.

    Equals sklearn's `roc_auc_score`. NaN with a warning when y_true holds one class only.
    """
    return _ranking_metric("roc_auc", y_true, y_prob)


def pr_auc(y_true: Any, y_prob: Any) -> float:
    """Average precision, as sklearn's `average_precision_score` (no interpolation).

    NaN with a warning when y_true holds one class only.
    """
    return _ranking_metric("pr_auc", y_true, y_prob)


# ---------------------------------------------------------------- calibration metrics


def brier(y_true: Any, y_prob: Any) -> float:
    """Mean squared difference between probability and outcome (lower is better)."""
    labels, probs = paired_inputs(y_true, y_prob)
    return float(np.mean((probs - labels) ** 2))


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = 15) -> float:
    """Weighted mean |mean probability − fraction positive| over equal-width bins.

    Bins split [0, 1] into `n_bins` intervals [a, b); the last one is closed, [a, 1].
    """
    labels, probs = paired_inputs(y_true, y_prob)
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    bins = np.minimum(np.searchsorted(edges, probs, side="right") - 1, int(n_bins) - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(bins, weights=probs, minlength=n_bins) - np.bincount(
        bins, weights=labels.astype(np.float64), minlength=n_bins
    )
    # sum_b (n_b / n) |mean_p_b - mean_y_b| = sum_b |sum_p_b - sum_y_b| / n
    return float(np.sum(np.abs(gap[count > 0])) / labels.size)


# ---------------------------------------------------------------- reports


_COUNT_METRICS = {
    "accuracy": accuracy,
    "sensitivity": sensitivity,
    "specificity": specificity,
    "precision": precision,
    "npv": npv,
    "f1": f1,
    "balanced_accuracy": balanced_accuracy,
}


def summarize(y_true: Any, y_prob: Any, threshold: float) -> dict[str, Any]:
    """Every metric of one split at one threshold (positive when `y_prob >= threshold`).

    Returns:
        Keys `n, accuracy, sensitivity, specificity, precision, npv, f1, balanced_accuracy,
        roc_auc, pr_auc, brier, ece, threshold, confusion_matrix` (the last a tn/fp/fn/tp dict).
    """
    labels, probs = paired_inputs(y_true, y_prob)
    threshold = _threshold(threshold)
    pred = (probs >= threshold).astype(np.int64)
    counted = {name: function(labels, pred) for name, function in _COUNT_METRICS.items()}
    return {
        "n": int(labels.size),
        **counted,
        "roc_auc": roc_auc(labels, probs),
        "pr_auc": pr_auc(labels, probs),
        "brier": brier(labels, probs),
        "ece": expected_calibration_error(labels, probs),
        "threshold": threshold,
        "confusion_matrix": confusion_matrix(labels, pred),
    }


def _group_weights(groups: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each image is drawn when whole groups are drawn with replacement.

    Returns:
        (n_resamples, n_images) counts; images of one group always share a count.
    """
    _, group_of_image = np.unique(groups, return_inverse=True)
    n_groups = int(group_of_image.max()) + 1
    draws = rng.integers(0, n_groups, size=(n_resamples, n_groups))
    # One bincount for all rows: shift row r's group ids by r * n_groups.
    flat = (draws + n_groups * np.arange(n_resamples)[:, None]).ravel()
    per_group = np.bincount(flat, minlength=n_resamples * n_groups).reshape(n_resamples, n_groups)
    return per_group[:, group_of_image].astype(np.float64)


def _weighted_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """The `CI_METRICS` of each weighted copy of the data (one row of `weights` each)."""
    positive, called = labels.astype(bool), probs >= threshold
    tp = weights @ (positive & called)
    fp = weights @ (~positive & called)
    fn = weights @ (positive & ~called)
    tn = weights @ (~positive & ~called)
    values = _rates(tn, fp, fn, tp)
    pos, neg = _level_weights(labels, probs, weights)
    values["roc_auc"] = _auc_from_levels(pos, neg)
    values["pr_auc"] = _ap_from_levels(pos, neg)
    return values


def bootstrap_ci(
    y_true: Any,
    y_prob: Any,
    threshold: float,
    groups: Any,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals that resample patients, not images.

    Args:
        groups: patient id of each image; a drawn patient brings all of their images.
        level: central coverage of each interval.

    Returns:
        `{metric: [low, high]}` for each of `CI_METRICS`. A resample where a metric is
        undefined is left out of that metric's interval; `[nan, nan]` if all are.
    """
    labels, probs = paired_inputs(y_true, y_prob)
    group_ids = _as_1d(groups, "groups")
    _same_length(labels, "y_true", group_ids, "groups")
    threshold = _threshold(threshold)
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer; got {n_resamples!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1; got {level!r}")
    weights = _group_weights(group_ids, int(n_resamples), np.random.default_rng(seed))
    samples = _weighted_metrics(labels, probs, threshold, weights)
    intervals = {}
    for metric in CI_METRICS:
        if np.isnan(samples[metric]).all():
            _undefined(f"the {metric} interval", "it is undefined in every resample", stacklevel=3)
        intervals[metric] = percentile_interval(samples[metric], level)
    return intervals


def percentile_interval(values: Any, level: float = 0.95) -> list[float]:
    """[low, high]: the central `level` of the defined (non-NaN) values, by percentiles;
    `[nan, nan]` when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    defined = values[~np.isnan(values)]
    if defined.size == 0:
        return [float("nan"), float("nan")]
    tail = 50.0 * (1.0 - level)
    return [float(v) for v in np.percentile(defined, [tail, 100.0 - tail])]


# The count metrics that are proportions: (the confusion cells that count, the cells of the
# denominator). Their intervals must hold at small counts, where a bootstrap collapses.
PROPORTIONS = {
    "accuracy": (("tp", "tn"), ("tp", "tn", "fp", "fn")),
    "sensitivity": (("tp",), ("tp", "fn")),
    "specificity": (("tn",), ("tn", "fp")),
    "precision": (("tp",), ("tp", "fp")),
    "npv": (("tn",), ("tn", "fn")),
}


def wilson_interval(successes: int, total: int, level: float = 0.95) -> list[float]:
    """The Wilson score interval of a proportion `successes / total`: unlike a percentile
    bootstrap it does not collapse to a point when every case is right (8 of 8 gives
    [0.676, 1.0], not [1.0, 1.0]); `[nan, nan]` when `total` is 0.

    Raises:
        ValueError: counts that are not 0 <= successes <= total, or a level outside (0, 1).
    """
    if not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total; got {successes} of {total}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1; got {level!r}")
    if total == 0:
        return [float("nan"), float("nan")]
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p, shrink = successes / total, 1 + z * z / total
    centre = (p + z * z / (2 * total)) / shrink
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / shrink
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return [low, high]


def interval_counts(cm: dict[str, int]) -> dict[str, int]:
    """n beside each interval: the cases each `CI_METRICS` metric is a proportion of (its
    denominator), or all cases for the others."""
    n = sum(cm.values())
    return {
        name: sum(cm[c] for c in PROPORTIONS[name][1]) if name in PROPORTIONS else n for name in CI_METRICS
    }


def small_sample_intervals(
    bootstrap: dict[str, list[float]], cm: dict[str, int], level: float = 0.95
) -> dict[str, list[float]]:
    """`bootstrap`'s intervals with each proportion's widened to take in its Wilson interval:
    the patient bootstrap keeps a patient's images together (wider when they agree), the
    Wilson interval holds at small counts (where the bootstrap shrinks to a point)."""
    intervals = dict(bootstrap)
    for name, (hits, cases) in PROPORTIONS.items():
        total = sum(cm[c] for c in cases)
        wilson = wilson_interval(sum(cm[c] for c in hits), total, level)
        low, high = bootstrap.get(name, [float("nan")] * 2)
        if total:
            intervals[name] = [float(np.nanmin([low, wilson[0]])), float(np.nanmax([high, wilson[1]]))]
    # Balanced accuracy is the mean of sensitivity and specificity: at least as wide as the
    # mean of their intervals.
    if all(
        intervals.get(name) and not np.isnan(intervals[name]).any() for name in ("sensitivity", "specificity")
    ):
        mean = [(a + b) / 2 for a, b in zip(intervals["sensitivity"], intervals["specificity"], strict=True)]
        low, high = bootstrap.get("balanced_accuracy", [float("nan")] * 2)
        intervals["balanced_accuracy"] = [float(np.nanmin([low, mean[0]])), float(np.nanmax([high, mean[1]]))]
    return intervals


def collapsed(interval: list[float] | None) -> bool:
    """Whether an interval is a single point (a bootstrap over too few or too uniform cases):
    it says nothing of the uncertainty, and the report says so."""
    return bool(interval) and interval[0] is not None and interval[0] == interval[1]


def to_json_safe(obj: Any) -> Any:
    """Plain Python values for `json.dumps`: NaN and ±inf become None, NumPy values unwrapped."""
    if isinstance(obj, dict):
        return {key: to_json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return to_json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return to_json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
