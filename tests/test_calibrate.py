"""pneumoscan.calibrate: the metadata.md formulas, fits on synthetic data, threshold rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression

from pneumoscan import calibrate, metrics
from pneumoscan.config import ThresholdRule

NONE = {"method": "none", "slope": 1.0, "intercept": 0.0, "fitted_on": None}


@pytest.mark.parametrize(
    "p, expected",
    [
        (0.5, 0.0),
        (0.75, math.log(3)),
        (0.1, -math.log(9)),
        (0.0, math.log(1e-7 / (1 - 1e-7))),  # clipped to 1e-7
        (1.0, math.log((1 - 1e-7) / (1 - (1 - 1e-7)))),  # clipped to the float64 1 - 1e-7
    ],
)
def test_logit_values(p, expected):
    assert calibrate.logit(p) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_logit_is_float64_for_float32_input():
    assert calibrate.logit(np.array([0.25, 0.5], dtype=np.float32)).dtype == np.float64


def test_none_is_identity_on_clipped_probabilities():
    p = np.random.default_rng(0).random(204).astype(np.float32)
    p[:4] = [0.0, 1.0, 1e-9, 0.5]
    calibrated = calibrate.apply_calibration(p, NONE)
    assert calibrated.dtype == np.float64
    expected = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    np.testing.assert_allclose(calibrated, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "p, method, slope, intercept, expected",
    [
        (0.75, "temperature", 2.0, 0.0, 0.9),  # logit 0.75 = ln 3; 2 ln 3 = ln 9
        (0.9, "temperature", 0.5, 0.0, 0.75),  # ln 9 / 2 = ln 3
        (0.5, "platt", 1.0, math.log(3), 0.75),
        (0.75, "platt", -1.0, 0.0, 0.25),
        (0.5, "platt", 3.0, -50.0, 1 / (1 + math.exp(50))),  # far tail, no overflow
    ],
)
def test_apply_calibration_formula(p, method, slope, intercept, expected):
    calibration = {"method": method, "slope": slope, "intercept": intercept, "fitted_on": "val"}
    assert calibrate.apply_calibration(p, calibration) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "calibration, match",
    [
        ({**NONE, "method": "isotonic"}, "calibration method 'isotonic' is unknown"),
        ({**NONE, "slope": 2.0}, "'none' needs slope 1 and intercept 0"),
        ({**NONE, "method": "platt", "slope": float("nan")}, "finite numbers"),
        ({**NONE, "method": "platt", "intercept": "0"}, "finite numbers"),
    ],
)
def test_apply_calibration_rejects_bad_dict(calibration, match):
    with pytest.raises(ValueError, match=match):
        calibrate.apply_calibration([0.5], calibration)


def _synthetic(slope: float, intercept: float, n: int = 20000, seed: int = 0):
    """Model outputs p = sigmoid(z) whose true probability is sigmoid(slope·z + intercept)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(slope * z + intercept)))).astype(int)
    return y, 1 / (1 + np.exp(-z))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_known_temperature(temperature):
    y, p = _synthetic(1 / temperature, 0.0)
    fitted = calibrate.fit_temperature(y, p, split="val")
    assert fitted["temperature"] == pytest.approx(temperature, rel=0.05)
    assert fitted["slope"] == pytest.approx(1 / fitted["temperature"], rel=1e-12)
    assert fitted["intercept"] == 0.0
    assert (fitted["method"], fitted["fitted_on"]) == ("temperature", "val")


def test_fit_temperature_lowers_the_loss():
    y, p = _synthetic(0.4, 0.0, n=2000, seed=1)
    fitted = calibrate.fit_temperature(y, p)
    before = metrics.brier(y, calibrate.apply_calibration(p, NONE))
    after = metrics.brier(y, calibrate.apply_calibration(p, fitted))
    assert after < before


def test_fit_temperature_warns_when_scores_separate_classes():
    with pytest.warns(UserWarning, match="search bound"):
        calibrate.fit_temperature([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])


def test_fit_platt_recovers_known_parameters_and_matches_sklearn():
    y, p = _synthetic(0.7, -0.4)
    fitted = calibrate.fit_platt(y, p, split="val")
    assert fitted["slope"] == pytest.approx(0.7, abs=0.05)
    assert fitted["intercept"] == pytest.approx(-0.4, abs=0.05)
    reference = LogisticRegression(C=1e10).fit(calibrate.logit(p)[:, None], y)
    # Platt's smoothed targets move the optimum only slightly at this size.
    assert fitted["slope"] == pytest.approx(reference.coef_[0, 0], abs=2e-3)
    assert fitted["intercept"] == pytest.approx(reference.intercept_[0], abs=2e-3)
    assert (fitted["method"], fitted["fitted_on"]) == ("platt", "val")


def test_fit_platt_uses_smoothed_targets_on_separable_scores():
    y, p = np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.7, 0.8, 0.9])
    fitted = calibrate.fit_platt(y, p)
    # Reference: each case split into a positive of weight t and a negative of weight 1 - t,
    # with Platt's targets t = 4/5 for positives and 1/4 for negatives.
    target = np.where(y == 1, 4 / 5, 1 / 4)
    z = np.tile(calibrate.logit(p), 2)[:, None]
    labels = np.r_[np.ones(5), np.zeros(5)]
    reference = LogisticRegression(C=1e12, tol=1e-12, max_iter=10000).fit(
        z, labels, sample_weight=np.r_[target, 1 - target]
    )
    assert fitted["slope"] == pytest.approx(reference.coef_[0, 0], abs=1e-5)
    assert fitted["intercept"] == pytest.approx(reference.intercept_[0], abs=1e-5)


@pytest.mark.parametrize("fit", [calibrate.fit_temperature, calibrate.fit_platt])
def test_fit_needs_both_classes(fit):
    with pytest.raises(ValueError, match=r"needs both classes in the 'val' split.*NORMAL"):
        fit([0, 0, 0], [0.1, 0.5, 0.9])


def test_fit_platt_needs_varied_scores():
    with pytest.raises(ValueError, match="varied scores"):
        calibrate.fit_platt([0, 1, 1], [0.3, 0.3, 0.3])


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("youden", ("youden", None)),
        ("sensitivity:0.95", ("sensitivity", 0.95)),
        ("sensitivity:1", ("sensitivity", 1.0)),
        ("fixed:0", ("fixed", 0.0)),
        ("fixed:0.5", ("fixed", 0.5)),
        ("fixed:1", ("fixed", 1.0)),
    ],
)
def test_parse_threshold_rule_accepts(rule, expected):
    parsed = ThresholdRule.parse(rule)
    assert (parsed.kind, parsed.value) == expected
    assert str(parsed) == rule


@pytest.mark.parametrize(
    "rule",
    [
        "",
        "Youden",
        "youden:1",
        "sensitivity",
        "sensitivity:0",
        "sensitivity:1.5",
        "fixed:-0.1",
        "fixed:abc",
        "fixed:nan",
        "fixed:0.5:1",
        "specificity:0.9",
        None,
    ],
)
def test_parse_threshold_rule_rejects(rule):
    message = r"threshold rule .* is not understood; use 'youden', 'sensitivity:X'"
    with pytest.raises(ValueError, match=message):
        ThresholdRule.parse(rule)


# Youden's J per candidate: .1→0 .2→.2 .3→.4 .4→.6 .45→.8 .5→.6 .6→.8 .7→.6 .8→.4 .9→.2
Y = [0, 0, 0, 0, 1, 0, 1, 1, 1, 1]
PROB = [0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9]


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("youden", 0.45),  # J ties at .45 and .6; .45 is closer to 0.5
        ("sensitivity:1", 0.45),
        ("sensitivity:0.8", 0.6),
        ("sensitivity:0.61", 0.6),
        ("sensitivity:0.6", 0.7),
        ("sensitivity:0.2", 0.9),
        ("fixed:0.3", 0.3),
    ],
)
def test_choose_threshold_hand_table(rule, expected):
    chosen = calibrate.choose_threshold(Y, PROB, ThresholdRule.parse(rule), split="val")
    assert chosen["value"] == pytest.approx(expected, abs=1e-12)
    assert chosen["rule"] == rule
    assert chosen["split"] == (None if rule.startswith("fixed") else "val")
    assert chosen["applies_to"] == "calibrated probability"


def test_youden_ties_go_to_the_threshold_closest_to_one_half():
    # J = .5 at .3 and at .55; .55 is closer to 0.5.
    chosen = calibrate.choose_threshold([0, 1, 0, 1], [0.2, 0.3, 0.5, 0.55], ThresholdRule.parse("youden"))
    assert chosen["value"] == 0.55


def test_youden_equally_close_ties_go_to_the_lower_threshold():
    # J = .5 at .375 and at .625, both 0.125 from 0.5.
    chosen = calibrate.choose_threshold(
        [0, 1, 0, 1], [0.25, 0.375, 0.5, 0.625], ThresholdRule.parse("youden")
    )
    assert chosen["value"] == 0.375


def test_fixed_rule_needs_no_data():
    assert calibrate.choose_threshold(None, None, ThresholdRule.parse("fixed:0.25"))["value"] == 0.25


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_youden_maximises_j_by_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    prob = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 2)

    def j(t: float) -> float:
        pred = (prob >= t).astype(int)
        return metrics.sensitivity(y, pred) + metrics.specificity(y, pred) - 1

    value = calibrate.choose_threshold(y, prob, ThresholdRule.parse("youden"))["value"]
    assert j(value) == pytest.approx(max(j(t) for t in np.unique(prob)), abs=1e-12)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_sensitivity_rule_is_the_largest_threshold_reaching_target(target):
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    prob = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1)
    value = calibrate.choose_threshold(y, prob, ThresholdRule.parse(f"sensitivity:{target}"))["value"]
    assert metrics.sensitivity(y, (prob >= value).astype(int)) >= target
    next_up = np.unique(prob)[np.unique(prob) > value].min()
    assert metrics.sensitivity(y, (prob >= next_up).astype(int)) < target


def test_data_rules_need_both_classes():
    with pytest.raises(ValueError, match="'youden' needs both classes in the 'val' split"):
        calibrate.choose_threshold([1, 1], [0.2, 0.8], ThresholdRule.parse("youden"))


# ---- properties, for any input (hypothesis) --------------------------------------------------


@st.composite
def _scored_labels(draw):
    size = draw(st.integers(2, 50))
    labels = draw(
        st.lists(st.integers(0, 1), min_size=size, max_size=size).filter(lambda v: 0 < sum(v) < len(v))
    )
    probs = draw(st.lists(st.integers(0, 20).map(lambda k: k / 20), min_size=size, max_size=size))
    return np.array(labels), np.array(probs)


def _rates(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float]:
    positive = p >= t
    return positive[y == 1].mean(), (~positive)[y == 0].mean()


@settings(max_examples=80, deadline=None)
@given(_scored_labels())
def test_youden_threshold_maximises_j_for_any_scores(case):
    y, p = case
    chosen = calibrate.choose_threshold(y, p, ThresholdRule.parse("youden"))["value"]
    best = max(sum(_rates(y, p, t)) for t in np.unique(p))
    assert sum(_rates(y, p, chosen)) == pytest.approx(best)


@settings(max_examples=80, deadline=None)
@given(_scored_labels(), st.sampled_from([0.5, 0.8, 0.9, 0.95, 1.0]))
def test_sensitivity_rule_is_the_highest_threshold_that_reaches_it(case, target):
    y, p = case
    chosen = calibrate.choose_threshold(y, p, ThresholdRule.parse(f"sensitivity:{target}"))["value"]
    assert _rates(y, p, chosen)[0] >= target - 1e-9
    assert all(_rates(y, p, t)[0] < target - 1e-9 for t in np.unique(p) if t > chosen)


@settings(max_examples=60, deadline=None)
@given(_scored_labels(), st.floats(0.05, 20.0), st.floats(-5.0, 5.0))
def test_calibration_keeps_the_order_of_scores(case, slope, intercept):
    _, p = case
    calibrated = calibrate.apply_calibration(p, {"method": "platt", "slope": slope, "intercept": intercept})
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(calibrated[order]) >= 0) and np.all((calibrated >= 0) & (calibrated <= 1))


@settings(max_examples=60, deadline=None)
@given(_scored_labels())
@example((np.array([1, 1, 0, 1]), np.array([0.0, 0.0, 0.05, 0.0])))  # once fitted 101 against 9.9
def test_platt_never_fits_worse_than_leaving_the_scores_alone(case):
    y, p = case
    assume(np.ptp(p) > 0)  # Platt needs varied scores
    fitted = calibrate.fit_platt(y, p)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))  # Platt's smoothed labels
    z = calibrate.logit(p)
    identity = calibrate._nll(target, z)
    assert calibrate._nll(target, fitted["slope"] * z + fitted["intercept"]) <= identity + 1e-9


# ---- the borderline band -------------------------------------------------------------------

# Ten answers around a threshold of 0.5, by their logit: two are wrong, at logits 0.25 (a
# NORMAL called PNEUMONIA) and -0.5 (the reverse); one right answer ties with the second at 0.5.
BAND_LOGITS = np.array([-3.0, -2.0, -1.0, -0.5, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0])
BAND_LABELS = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 1])


@pytest.mark.parametrize(
    "max_error_rate, half_width, inside, errors_outside",
    [
        (0.2, 0.0, 0, 2),  # 2 wrong of 10 already: no band
        (0.15, 0.375, 1, 1),  # 0.25 inside: 1 wrong of the 9 outside (0.11)
        (0.1, 0.75, 3, 0),  # the tie at 0.5 cannot be split: 0.25, 0.5 and 0.5 inside
        (0.0, 0.75, 3, 0),
    ],
)
def test_borderline_band_hand_table(max_error_rate, half_width, inside, errors_outside):
    prob = 1.0 / (1.0 + np.exp(-BAND_LOGITS))
    band = calibrate.fit_borderline(BAND_LABELS, prob, 0.5, max_error_rate)
    assert band["logit_half_width"] == pytest.approx(half_width)
    assert band["low"] == pytest.approx(1 / (1 + math.exp(half_width)))
    assert band["high"] == pytest.approx(1 / (1 + math.exp(-half_width)))
    assert (band["val"]["inside"], band["val"]["errors_outside"]) == (inside, errors_outside)
    assert band["val"]["errors_inside"] == 2 - errors_outside
    assert sum(band["low"] < p < band["high"] for p in prob) == inside


def test_borderline_band_holds_everything_when_a_confident_answer_is_wrong():
    labels = BAND_LABELS.copy()
    labels[-1] = 0  # logit 4, called PNEUMONIA, is NORMAL: no band short of everything will do
    prob = 1.0 / (1.0 + np.exp(-BAND_LOGITS))
    band = calibrate.fit_borderline(labels, prob, 0.5, 0.0)
    assert band["logit_half_width"] == pytest.approx(5.0) and band["val"]["inside"] == 10
    assert band["val"]["error_rate_outside"] is None


def test_borderline_band_is_centred_on_the_threshold_in_logit():
    prob = 1.0 / (1.0 + np.exp(-(BAND_LOGITS + math.log(3))))  # every answer moved by logit(0.75)
    band = calibrate.fit_borderline(BAND_LABELS, prob, 0.75, 0.15)
    assert math.log(band["low"] / (1 - band["low"])) == pytest.approx(math.log(3) - 0.375)
    assert math.log(band["high"] / (1 - band["high"])) == pytest.approx(math.log(3) + 0.375)


def test_operating_point_carries_the_band_of_its_threshold():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 400)
    raw = 1.0 / (1.0 + np.exp(-(3.0 * (labels - 0.5) + rng.normal(0, 1.5, 400))))
    fitted = calibrate.fit_operating_point(labels, raw, ThresholdRule.parse("youden"))
    band = fitted["borderline"]
    assert band["threshold"] == fitted["threshold"]["value"] and band["split"] == "val"
    assert band["low"] < band["threshold"] < band["high"]
    assert band["val"]["error_rate_outside"] <= calibrate.BORDERLINE_MAX_ERROR


# Beyond the clip: `logit` clips at 1e-7, so every probability above 1 - 1e-7 (or below 1e-7) is
# as far from the threshold as the clip itself; the band must treat them all alike.
BEYOND_CLIP = np.array([0.0, 1e-12, 1e-9, 1e-7, 0.2, 0.45, 0.55, 0.8, 1 - 1e-7, 1 - 1e-9, 1 - 1e-12, 1.0])


def test_a_band_of_every_image_takes_in_probabilities_beyond_the_clip():
    labels = (BEYOND_CLIP >= 0.5).astype(int)
    labels[-1] = 0  # probability 1.0, NORMAL: only a band of everything will do
    band = calibrate.fit_borderline(labels, BEYOND_CLIP, 0.5, 0.0)
    assert band["val"]["inside"] == BEYOND_CLIP.size
    assert (band["low"], band["high"]) == (0.0, 1.0)
    assert calibrate.in_band(BEYOND_CLIP, band["low"], band["high"]).all()
    assert calibrate.in_band(np.nextafter(1.0, 0.0), band["low"], band["high"])


@pytest.mark.parametrize("threshold", [0.5, 0.9, 1e-3])
@pytest.mark.parametrize("max_error_rate", [0.0, 0.1, 0.2])
def test_the_band_counts_what_it_flags_beyond_the_clip(threshold, max_error_rate):
    rng = np.random.default_rng(int(threshold * 1000) + int(max_error_rate * 10))
    labels = rng.integers(0, 2, BEYOND_CLIP.size)
    band = calibrate.fit_borderline(labels, BEYOND_CLIP, threshold, max_error_rate)
    flagged = calibrate.in_band(BEYOND_CLIP, band["low"], band["high"])
    assert flagged.sum() == band["val"]["inside"]
    # The probabilities the clip makes equal are all inside or all outside.
    assert len(set(flagged[-3:])) == 1 and len(set(flagged[:3])) == 1
    called = threshold <= BEYOND_CLIP
    outside_errors = ((called != (labels == 1)) & ~flagged).sum()
    assert outside_errors == band["val"]["errors_outside"]
    assert outside_errors <= max_error_rate * max((~flagged).sum(), 1) + 1e-12 or flagged.all()


def test_in_band_is_open_inside_zero_and_one():
    assert list(calibrate.in_band([0.2, 0.3, 0.5, 0.7, 0.8], 0.3, 0.7)) == [False, False, True, False, False]
    assert list(calibrate.in_band([0.0, 1.0, 0.5], 0.0, 1.0)) == [True, True, True]
    assert not calibrate.in_band(1.0, 0.2, 0.99) and not calibrate.in_band(0.5, 0.5, 0.5)


# ---- exp and log written out, one formula with the page's -----------------------------------


def test_exact_exp_and_log_are_within_an_ulp_of_numpy():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-745, 709, 20000), rng.normal(0, 3, 20000), [0.0, -0.0, 1e-30, -1e-30]])
    expected = np.exp(x)
    assert np.all(np.abs(calibrate.exact_exp(x) - expected) <= np.spacing(expected))
    positive = np.concatenate([np.exp(rng.uniform(-16.2, 16.2, 20000)), [1.0, 1e-7, 1e7, 1 + 2**-30]])
    expected = np.log(positive)
    assert np.all(np.abs(calibrate.exact_log(positive) - expected) <= np.abs(np.spacing(expected)))
    assert calibrate.exact_log(1.0) == 0.0 and calibrate.exact_exp(0.0) == 1.0


def test_exact_exp_at_its_edges():
    values = calibrate.exact_exp([-800.0, 800.0, -np.inf, np.inf, np.nan, -740.0])
    assert values[0] == 0.0 and values[1] == np.inf and values[2] == 0.0 and values[3] == np.inf
    assert np.isnan(values[4]) and values[5] == pytest.approx(np.exp(-740.0), rel=1e-12)


def test_exact_log_at_its_edges():
    # Subnormals, zero, infinity, NaN and negative numbers as np.log gives them: a NaN output of
    # a model on a damaged file must not stop a batch.
    x = np.array([5e-324, 1e-310, 2.2250738585072014e-308, 0.0, -0.0, np.inf, np.nan, -1.0, 1.7e308])
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.log(x)
    got = calibrate.exact_log(x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    finite = np.isfinite(expected)
    assert np.all(np.abs(got[finite] - expected[finite]) <= np.abs(np.spacing(expected[finite])))
    assert list(got[3:6]) == [-np.inf, -np.inf, np.inf]
    assert np.isnan(calibrate.logit(np.nan)) and np.isnan(calibrate.apply_calibration(np.nan, NONE))


def test_sigmoid_is_one_formula_on_both_sides_of_zero():
    # 1 / (1 + e) and e / (1 + e) with e = exp(-|z|): sigmoid(-z) = 1 - sigmoid(z) up to rounding,
    # and the calibrated probability of a clipped logit is the sigmoid of slope z + intercept.
    z = np.linspace(-40, 40, 8001)
    s = calibrate._sigmoid(z)
    assert np.all(np.diff(s) >= 0) and s[0] > 0 and s[-1] == 1.0
    np.testing.assert_allclose(s + s[::-1], 1.0, atol=1e-15)
    p = np.linspace(0.001, 0.999, 999)
    calibration = {"method": "platt", "slope": 1.3, "intercept": -0.4, "fitted_on": "val"}
    expected = calibrate._sigmoid(1.3 * calibrate.logit(p) - 0.4)
    np.testing.assert_array_equal(calibrate.apply_calibration(p, calibration), expected)
