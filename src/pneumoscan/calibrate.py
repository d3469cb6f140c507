"""Calibration, decision threshold and the band of borderline answers around it: `pneumoscan
train` fits all three on the validation split, `pneumoscan threshold` re-chooses them for a
trained model. `fit_operating_point` does so from arrays of labels and raw model outputs.

The formulas follow `docs/metadata.md` (section "Calibration and decision"); the web page
applies the same ones, so everything here is float64 and written out, not delegated to a
library. Fitting needs only NumPy: the losses are one- or two-parameter and convex.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np

from pneumoscan.config import ThresholdRule
from pneumoscan.metrics import paired_inputs, summarize, to_json_safe

EPSILON = 1e-7  # probabilities are clipped to [EPSILON, 1 - EPSILON] before the logit
METHODS = ("none", "temperature", "platt")
APPLIES_TO = "calibrated probability"
# Temperature is searched on log T within these bounds. Reaching the lower one means the
# scores separate the classes (the optimum is T -> 0); the upper one, that they carry no
# signal or the wrong sign (T -> infinity). Either way a warning says so.
TEMPERATURE_BOUNDS = (1e-3, 1e3)
# Outside the borderline band the val split may err on at most this share of images.
BORDERLINE_MAX_ERROR = 0.01
BAND_FLAG = "borderline = low < probability < high; an end at 0 or 1 takes in 0 or 1 itself"


def in_band(probability: Any, low: float, high: float) -> np.ndarray:
    """`BAND_FLAG`: low < probability < high, the end 0 or 1 included when the band reaches it
    (a band of every image), bool array."""
    p = np.asarray(probability, dtype=np.float64)
    return ((low < p) | (low <= 0.0)) & ((p < high) | (high >= 1.0))


def logit(p: Any) -> np.ndarray:
    """log(q / (1 - q)) in float64 with q = clip(p, 1e-7, 1 - 1e-7), `log` being `exact_log`
    (NaN for NaN)."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPSILON, 1.0 - EPSILON)
    return exact_log(q / (1.0 - q))  # literally the metadata.md formula, as the web page computes it


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + e) for z >= 0 and e / (1 + e) below, e = exp(-|z|) (`exact_exp`): exp never
    overflows, and the page's `sigmoid` (web/decision.js) does the same operations."""
    z = np.asarray(z, dtype=np.float64)
    e = exact_exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


# ---- exp and log written out, so that Python and the page agree bit for bit ----------------
# np.exp (the C library's) and the page's Math.exp (V8's fdlibm) differ by an ulp on about one
# argument in ten, np.log and Math.log on one in twenty. Both functions below are fdlibm's
# (e_exp.c, e_log.c) in float64 operations that IEEE 754 rounds alike everywhere, written the
# same way in web/decision.js (`exactExp`, `exactLog`); tests/test_decision_js.py compares them.
_LN2_HI, _LN2_LO, _INV_LN2 = 6.93147180369123816490e-01, 1.90821492927058770002e-10, 1.44269504088896338700e00
_EXP_P = (1.66666666666666019037e-01, -2.77777777770155933842e-03, 6.61375632143793436117e-05)
_EXP_P += (-1.65339022054652515390e-06, 4.13813679705723846039e-08)
_LOG_LG = (6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01)
_LOG_LG += (2.222219843214978396e-01, 1.818357216161805012e-01, 1.531383769920937332e-01)
_LOG_LG += (1.479819860511658591e-01,)
_EXP_OVER, _EXP_UNDER = 7.09782712893383973096e02, -7.45133219101941108420e02
_TWO_M1000 = 9.33263618503218878990e-302  # 2 ** -1000
_TWO_54 = 1.80143985094819840000e16  # 2 ** 54


def _high_word(x: np.ndarray) -> np.ndarray:
    return (x.view(np.uint64) >> np.uint64(32)).astype(np.int64)


def _with_high_word(x: np.ndarray, high: np.ndarray) -> np.ndarray:
    low = x.view(np.uint64) & np.uint64(0xFFFFFFFF)
    return ((high.astype(np.uint64) << np.uint64(32)) | low).view(np.float64)


def exact_exp(x: Any) -> np.ndarray:
    """e ** x, float64, by fdlibm's algorithm (under 1 ulp from the true value)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):  # infinities and NaN run through lanes np.where then drops
        return _exp(x.reshape(-1)).reshape(x.shape)


def _exp(x: np.ndarray) -> np.ndarray:
    magnitude = _high_word(x) & 0x7FFFFFFF
    negative = (x < 0).astype(np.int64)
    # Argument reduction: x = k ln2 + r, |r| <= 0.5 ln2, with ln2 in two parts.
    near = magnitude < 0x3FF0A2B2  # |x| < 1.5 ln2: k = +-1
    rounding = np.where(negative == 1, -0.5, 0.5)
    k_far = np.trunc(np.nan_to_num(np.clip(_INV_LN2 * x, -1100.0, 1100.0)) + rounding)
    k = np.where(magnitude > 0x3FD62E42, np.where(near, 1 - 2 * negative, k_far), 0).astype(np.int64)
    hi = np.where(near, x - np.where(negative == 1, -_LN2_HI, _LN2_HI), x - k * _LN2_HI)
    lo = np.where(near, np.where(negative == 1, -_LN2_LO, _LN2_LO), k * _LN2_LO)
    r = np.where(k == 0, x, hi - lo)
    t = r * r
    p1, p2, p3, p4, p5 = _EXP_P
    c = r - t * (p1 + t * (p2 + t * (p3 + t * (p4 + t * p5))))
    small = 1.0 - ((r * c) / (c - 2.0) - r)
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
    normal = k >= -1021
    scaled = _with_high_word(y, _high_word(y) + np.where(normal, k, k + 1000) * (1 << 20))
    out = np.where(k == 0, small, np.where(normal, scaled, scaled * _TWO_M1000))
    out = np.where(magnitude < 0x3E300000, 1.0 + x, out)  # |x| < 2 ** -28
    out = np.where(x > _EXP_OVER, np.inf, np.where(x < _EXP_UNDER, 0.0, out))
    return np.where(np.isnan(x), x, out)


def exact_log(x: Any) -> np.ndarray:
    """The natural logarithm, float64, by fdlibm's algorithm (under 1 ulp from the true value);
    log(0) = -inf, log(inf) = inf, NaN for NaN and negative numbers, as np.log gives them."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):  # the special lanes run through arithmetic np.where drops
        return _log(x.reshape(-1)).reshape(x.shape)


def _log(x: np.ndarray) -> np.ndarray:
    subnormal = (x > 0) & (x < np.finfo(np.float64).tiny)
    scaled = np.where(subnormal, x * _TWO_54, x)  # exact: subnormals made normal, k made up below
    high = _high_word(scaled)
    k = (high >> 20) - 1023 - np.where(subnormal, 54, 0)
    mantissa = high & 0x000FFFFF
    i = (mantissa + 0x95F64) & 0x100000
    f = _with_high_word(scaled, mantissa | (i ^ 0x3FF00000)) - 1.0  # in [sqrt(2)/2 - 1, sqrt(2) - 1)
    dk = (k + (i >> 20)).astype(np.float64)
    # |f| < 2 ** -20
    tiny_r = f * f * (0.5 - 0.33333333333333333 * f)
    tiny = np.where(f == 0.0, dk * _LN2_HI + dk * _LN2_LO, dk * _LN2_HI - ((tiny_r - dk * _LN2_LO) - f))
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    lg1, lg2, lg3, lg4, lg5, lg6, lg7 = _LOG_LG
    r = z * (lg1 + w * (lg3 + w * (lg5 + w * lg7))) + w * (lg2 + w * (lg4 + w * lg6))
    half_square = 0.5 * f * f
    wide = ((mantissa - 0x6147A) | (0x6B851 - mantissa)) > 0
    general = np.where(
        wide,
        dk * _LN2_HI - ((half_square - (s * (half_square + r) + dk * _LN2_LO)) - f),
        dk * _LN2_HI - ((s * (f - r) - dk * _LN2_LO) - f),
    )
    out = np.where((0x000FFFFF & (2 + mantissa)) < 3, tiny, general)
    special = np.where(x == 0.0, -np.inf, np.where(x == np.inf, np.inf, np.nan))
    return np.where((x > 0) & (x < np.inf), out, special)


def apply_calibration(p: Any, calibration: dict[str, Any]) -> np.ndarray:
    """Calibrated probability sigmoid(slope · logit(p) + intercept), in float64.

    Args:
        p: model outputs in [0, 1], any shape.
        calibration: `{"method", "slope", "intercept", "fitted_on"}` as in metadata.json.

    Raises:
        ValueError: unknown method, non-finite parameters, or `none` with slope ≠ 1 or
            intercept ≠ 0.
    """
    method = calibration.get("method")
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r} is unknown; expected one of {METHODS}")
    slope, intercept = calibration.get("slope"), calibration.get("intercept")
    numeric = (isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (slope, intercept))
    if not all(numeric) or not (math.isfinite(slope) and math.isfinite(intercept)):
        raise ValueError(
            f"calibration slope and intercept must be finite numbers; got {slope!r}, {intercept!r}"
        )
    if method == "none" and (slope != 1 or intercept != 0):
        # Numbers as floats, so that the page (web/preprocess.js) can write the same sentence.
        raise ValueError(
            f"calibration method 'none' needs slope 1 and intercept 0; got {float(slope)}, {float(intercept)}"
        )
    return _sigmoid(float(slope) * logit(p) + float(intercept))


def _nll(labels: np.ndarray, z: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities sigmoid(z); log(1 + e^z) computed stably."""
    return float(np.mean(np.logaddexp(0.0, z) - labels * z))


def _fit_inputs(y_true: Any, p: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    labels, probs = paired_inputs(y_true, p, prob_name="p")
    if labels.min() == labels.max():
        only = "PNEUMONIA (1)" if labels[0] == 1 else "NORMAL (0)"
        raise ValueError(f"calibration needs both classes in the {split!r} split, but it holds only {only}")
    return labels.astype(np.float64), logit(probs)


def fit_temperature(y_true: Any, p: Any, split: str = "val") -> dict[str, Any]:
    """Temperature T > 0 minimising the NLL of sigmoid(logit(p) / T).

    A golden-section search on log T: the NLL is convex in 1/T, so it has one minimum
    along log T. T is kept within `TEMPERATURE_BOUNDS`.

    Returns:
        `{"method": "temperature", "slope": 1/T, "intercept": 0.0, "fitted_on": split,
        "temperature": T}`.

    Raises:
        ValueError: y_true holds one class only, or bad shapes/values.
    """
    labels, z = _fit_inputs(y_true, p, split)
    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = _nll(labels, z * math.exp(-a)), _nll(labels, z * math.exp(-b))
    while high - low > 1e-10:
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = _nll(labels, z * math.exp(-a))
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = _nll(labels, z * math.exp(-b))
    temperature = math.exp((low + high) / 2.0)
    if not TEMPERATURE_BOUNDS[0] * 1.001 < temperature < TEMPERATURE_BOUNDS[1] / 1.001:
        warnings.warn(
            f"temperature reached its search bound ({temperature:.3g}): the {split!r} scores "
            "separate the classes perfectly or not at all; consider Platt scaling",
            stacklevel=2,
        )
    return {
        "method": "temperature",
        "slope": 1.0 / temperature,
        "intercept": 0.0,
        "fitted_on": split,
        "temperature": temperature,
    }


def fit_platt(y_true: Any, p: Any, split: str = "val") -> dict[str, Any]:
    """Logistic regression of y on logit(p): slope and intercept, by Newton's method.

    Targets are Platt's (1999) smoothed labels, (n₊ + 1)/(n₊ + 2) for positives and
    1/(n₋ + 2) for negatives, so the fit stays finite when the scores separate the classes.

    Returns:
        `{"method": "platt", "slope", "intercept", "fitted_on": split}`.

    Raises:
        ValueError: y_true holds one class only, or every p gives the same logit.
    """
    labels, z = _fit_inputs(y_true, p, split)
    if np.ptp(z) == 0:
        raise ValueError(f"Platt scaling needs varied scores, but every p in {split!r} is the same")
    n_pos = labels.sum()
    n_neg = labels.size - n_pos
    target = np.where(labels == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    slope, intercept = _newton_logistic(np.column_stack([z, np.ones_like(z)]), target)
    return {"method": "platt", "slope": slope, "intercept": intercept, "fitted_on": split}


def _newton_logistic(design: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Minimise the cross-entropy of sigmoid(design @ params) against targets in (0, 1).

    Args:
        design: (n, 2) columns logit(p) and 1.
    """
    params = np.array([1.0, 0.0])
    loss = _nll(target, design @ params)
    for _ in range(100):
        s = _sigmoid(design @ params)
        gradient = design.T @ (s - target)
        hessian = (design * (s * (1 - s))[:, None]).T @ design  # (2, 2)
        step = np.linalg.solve(hessian + 1e-12 * np.eye(2), gradient)
        scale = 1.0
        while scale > 1e-10 and _nll(target, design @ (params - scale * step)) > loss:
            scale /= 2  # backtrack: a full Newton step can overshoot far from the optimum
        if _nll(target, design @ (params - scale * step)) > loss:
            break  # no step lowers the loss (a near-singular Hessian gives a huge one): stop here
        params = params - scale * step
        new_loss = _nll(target, design @ params)
        converged = loss - new_loss < 1e-15 and np.max(np.abs(scale * step)) < 1e-10
        loss = new_loss
        if converged:
            break
    return float(params[0]), float(params[1])


def _youden(
    candidates: np.ndarray, n_pos_at: np.ndarray, n_neg_below: np.ndarray, n_pos: int, n_neg: int
) -> float:
    # J·n_pos·n_neg in integers, so equal J values compare equal exactly.
    scaled_j = n_pos_at * n_neg + n_neg_below * n_pos
    best = candidates[scaled_j == scaled_j.max()]
    distance = np.abs(best - 0.5)
    # Tie rule: closest to 0.5; between two equally close, the lower (more sensitive) one.
    return float(best[distance == distance.min()].min())


def choose_threshold(y_true: Any, prob: Any, rule: ThresholdRule, split: str = "val") -> dict[str, Any]:
    """The decision threshold on calibrated probabilities; positive when prob >= threshold.

    `rule` is parsed where it enters (`Config`, the CLI). Candidates are the distinct values of `prob`.
    - `youden`: maximises sensitivity + specificity − 1. Ties go to the candidate closest to
      0.5, and between two equally close, to the lower one (the more sensitive screen).
    - `sensitivity:X`: the largest candidate whose sensitivity is at least X.
    - `fixed:X`: X itself; `y_true` and `prob` are not used and `split` is recorded as None.

    Returns:
        `{"value", "rule", "split", "applies_to": "calibrated probability"}`.

    Raises:
        ValueError: a data-driven rule gets one class only.
    """
    kind, number = rule.kind, rule.value
    if kind == "fixed":
        return {"value": float(number), "rule": str(rule), "split": None, "applies_to": APPLIES_TO}
    labels, probs = paired_inputs(y_true, prob, prob_name="prob")
    if labels.min() == labels.max():
        raise ValueError(f"threshold rule {str(rule)!r} needs both classes in the {split!r} split")
    candidates = np.unique(probs)
    positives, negatives = np.sort(probs[labels == 1]), np.sort(probs[labels == 0])
    n_pos_at = positives.size - np.searchsorted(positives, candidates, side="left")  # prob >= t
    if kind == "youden":
        n_neg_below = np.searchsorted(negatives, candidates, side="left")  # prob < t
        value = _youden(candidates, n_pos_at, n_neg_below, positives.size, negatives.size)
    else:
        # Sensitivity falls as t rises; a tiny slack absorbs X·n_pos rounding (0.95·20).
        reached = n_pos_at >= number * positives.size - 1e-9
        value = float(candidates[reached].max())
    return {"value": value, "rule": str(rule), "split": split, "applies_to": APPLIES_TO}


def fit_operating_point(y_true: Any, raw: Any, rule: ThresholdRule, split: str = "val") -> dict:
    """Platt scaling fitted on `raw` model outputs, then the threshold chosen by `rule` on the
    calibrated probabilities of the same (validation) split, the metrics there, and the band of
    borderline answers around that threshold (`fit_borderline`).

    Platt rather than temperature: class weights train the model as if both classes were
    equally common, which shifts its logits by a constant; temperature scaling (slope only)
    cannot undo that shift, Platt's intercept does.

    Returns:
        `{"calibration", "threshold", "metrics", "borderline"}`: the metadata.json blocks and
        the metrics of the split at that threshold (metadata's `metrics.<split>`).

    Raises:
        ValueError: one class only, bad shapes or values.
    """
    calibration = fit_platt(y_true, raw, split=split)
    calibrated = apply_calibration(raw, calibration)
    threshold = choose_threshold(y_true, calibrated, rule, split=split)
    metrics = to_json_safe(summarize(y_true, calibrated, threshold["value"]))
    borderline = fit_borderline(y_true, calibrated, threshold["value"], split=split)
    return {"calibration": calibration, "threshold": threshold, "metrics": metrics, "borderline": borderline}


def fit_borderline(
    y_true: Any, prob: Any, threshold: float, max_error_rate: float = BORDERLINE_MAX_ERROR, split: str = "val"
) -> dict[str, Any]:
    """The band of borderline answers: the narrowest band around the threshold, symmetric in
    logit, outside which the split's error rate is at most `max_error_rate`.

    Each image's distance is |logit(prob) − logit(threshold)| (`logit` clips to 1e-7). Bands
    are cut halfway between consecutive distinct distances (or at 0); the first cut whose
    outside images err at most `max_error_rate` of the time gives the half-width w. An answer
    is borderline when low < probability < high, low and high being the threshold's logit
    ∓ w mapped back to probabilities. w = 0 (no band) when the split errs rarely enough as it
    is; a band holding every image when no narrower one will do: then low 0 and high 1, which
    `in_band` takes in, so that no probability falls outside it.

    Returns:
        metadata.json's `borderline` block: `low`, `high`, `logit_half_width`, the rule, and
        what the split shows inside and outside the band.

    Raises:
        ValueError: bad shapes or values, or a rate outside [0, 1).
    """
    if not 0.0 <= max_error_rate < 1.0:
        raise ValueError(f"max_error_rate must be in [0, 1), got {max_error_rate}")
    labels, probs = paired_inputs(y_true, prob, prob_name="prob")
    centre = float(logit(threshold))
    distance = np.abs(logit(probs) - centre)
    order = np.argsort(distance, kind="stable")
    ranked, wrong = distance[order], ((probs >= threshold) != (labels == 1))[order]
    inside, half, outside_errors = _band_cut(ranked, wrong, max_error_rate)
    n, outside = ranked.size, ranked.size - inside
    # A band of every image is the whole range, 0 to 1 with its ends taken in (`in_band`): in
    # logit, ranked[-1] + 1 stops short of probabilities above 1 - 1e-7, which `logit` clips.
    everything = inside == n and n > 0
    return {
        "low": 0.0 if everything else float(_sigmoid(np.float64(centre - half))),
        "high": 1.0 if everything else float(_sigmoid(np.float64(centre + half))),
        "applies_to": APPLIES_TO,
        "flag": BAND_FLAG,
        "rule": "the narrowest band, symmetric in logit around the threshold, outside which the "
        f"{split} error rate is at most max_error_rate",
        "max_error_rate": max_error_rate,
        "logit_half_width": half,
        "threshold": float(threshold),
        "split": split,
        split: {
            "n": int(n),
            "inside": inside,
            "errors_inside": int(wrong.sum()) - outside_errors,
            "errors_outside": outside_errors,
            "error_rate_outside": outside_errors / outside if outside else None,
        },
    }


def _band_cut(ranked: np.ndarray, wrong: np.ndarray, max_error_rate: float) -> tuple[int, float, int]:
    """(images inside, half-width, errors outside) of the first cut of `ranked` distances
    (ascending) whose outside images err at most `max_error_rate` of the time."""
    n = ranked.size
    outside_errors = np.concatenate([np.cumsum(wrong[::-1])[::-1], [0]])  # errors among ranked[i:]
    rate = outside_errors / np.maximum(n - np.arange(n + 1), 1)
    cuts = np.r_[True, ranked[1:] > ranked[:-1], True]  # cut i: ranked[:i] inside, ranked[i:] outside
    i = int(np.flatnonzero(cuts & (rate <= max_error_rate))[0])
    if i == 0:
        half = 0.0
    elif i == n:
        half = float(ranked[-1]) + 1.0  # every image inside
    else:
        half = float(ranked[i - 1] + ranked[i]) / 2.0
    return i, half, int(outside_errors[i])


def describe_calibration(calibration: dict) -> str:
    """`platt: slope 1.02, intercept 0.85` and the like, for logs."""
    return (
        f"{calibration['method']}: slope {calibration['slope']:.3f}, intercept {calibration['intercept']:.3f}"
    )
