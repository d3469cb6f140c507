"""pneumoscan.metrics: hand-computed tables, agreement with scikit-learn, patient bootstrap."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from pneumoscan import metrics
from pneumoscan.metrics import UndefinedMetricWarning

# 3 TP, 1 FN, 1 FP, 5 TN
TABLE_A = ([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
# 1 TP, 1 FN, 0 FP, 1 TN
TABLE_B = ([1, 1, 0], [1, 0, 0])


@pytest.mark.parametrize(
    "function, table, expected",
    [
        (metrics.accuracy, TABLE_A, 0.8),
        (metrics.sensitivity, TABLE_A, 0.75),
        (metrics.specificity, TABLE_A, 5 / 6),
        (metrics.precision, TABLE_A, 0.75),
        (metrics.ppv, TABLE_A, 0.75),
        (metrics.npv, TABLE_A, 5 / 6),
        (metrics.f1, TABLE_A, 0.75),
        (metrics.balanced_accuracy, TABLE_A, (0.75 + 5 / 6) / 2),
        (metrics.accuracy, TABLE_B, 2 / 3),
        (metrics.sensitivity, TABLE_B, 0.5),
        (metrics.specificity, TABLE_B, 1.0),
        (metrics.precision, TABLE_B, 1.0),
        (metrics.npv, TABLE_B, 0.5),
        (metrics.f1, TABLE_B, 2 / 3),
        (metrics.balanced_accuracy, TABLE_B, 0.75),
    ],
)
def test_count_metrics_on_hand_tables(function, table, expected):
    assert function(*table) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "table, expected",
    [
        (TABLE_A, {"tn": 5, "fp": 1, "fn": 1, "tp": 3}),
        (TABLE_B, {"tn": 1, "fp": 0, "fn": 1, "tp": 1}),
        (([0, 0], [1, 1]), {"tn": 0, "fp": 2, "fn": 0, "tp": 0}),
    ],
)
def test_confusion_matrix_counts(table, expected):
    counts = metrics.confusion_matrix(*table)
    assert counts == expected
    assert all(type(value) is int for value in counts.values())


@pytest.mark.parametrize(
    "function, y_true, y_prob, expected",
    [
        (metrics.roc_auc, [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        (metrics.roc_auc, [0, 1], [0.5, 0.5], 0.5),  # a tied pair counts one half
        (metrics.roc_auc, [0, 0, 1, 1], [0.2, 0.6, 0.6, 0.9], 0.875),
        (metrics.roc_auc, [1, 1, 0], [0.1, 0.2, 0.9], 0.0),
        (metrics.pr_auc, [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.5 * 1 + 0.5 * 2 / 3),
        (metrics.pr_auc, [0, 0, 1, 1], [0.2, 0.6, 0.6, 0.9], 0.5 * 1 + 0.5 * 2 / 3),
        (metrics.pr_auc, [1, 0, 0, 1], [0.9, 0.8, 0.7, 0.6], 0.5 * 1 + 0.5 * 2 / 4),
        (metrics.brier, [0, 1], [0.2, 0.6], (0.04 + 0.16) / 2),
        (metrics.brier, [1, 1, 0], [1.0, 0.0, 0.0], 1 / 3),
        (metrics.expected_calibration_error, [0, 1, 1, 0], [0.1, 0.1, 0.9, 0.9], 0.4),
        (metrics.expected_calibration_error, [1], [1.0], 0.0),  # 1.0 falls in the last bin
        (metrics.expected_calibration_error, [0, 1, 1], [0.0, 1.0, 0.95], 0.05 / 3),
    ],
)
def test_probability_metrics_on_hand_tables(function, y_true, y_prob, expected):
    assert function(y_true, y_prob) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "y_true, y_prob, expected",
    [
        # bins [0, .5) and [.5, 1]: (.3 - .5)/2 + (.8 - 1)/2 in absolute value
        ([0, 1, 1, 1], [0.2, 0.4, 0.6, 1.0], 0.2),
        # 0.5 belongs to the upper bin: |.4 - 0| / 2 + |.5 - 1| / 2, not |.45 - .5|
        ([0, 1], [0.4, 0.5], 0.45),
    ],
)
def test_ece_bin_edges(y_true, y_prob, expected):
    value = metrics.expected_calibration_error(y_true, y_prob, n_bins=2)
    assert value == pytest.approx(expected, abs=1e-12)


def _random_case(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    # Rounded to one decimal so that many scores tie, within and across classes.
    prob = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.25), 0, 1), 1)
    return y, prob


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_agrees_with_sklearn(seed):
    y, prob = _random_case(seed)
    pred = (prob >= 0.5).astype(int)
    assert metrics.roc_auc(y, prob) == pytest.approx(skm.roc_auc_score(y, prob), abs=1e-12)
    assert metrics.pr_auc(y, prob) == pytest.approx(skm.average_precision_score(y, prob), abs=1e-12)
    assert metrics.brier(y, prob) == pytest.approx(skm.brier_score_loss(y, prob), abs=1e-12)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert metrics.confusion_matrix(y, pred) == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert metrics.f1(y, pred) == pytest.approx(skm.f1_score(y, pred), abs=1e-12)
    assert metrics.balanced_accuracy(y, pred) == pytest.approx(
        skm.balanced_accuracy_score(y, pred), abs=1e-12
    )
    assert metrics.precision(y, pred) == pytest.approx(skm.precision_score(y, pred), abs=1e-12)
    assert metrics.sensitivity(y, pred) == pytest.approx(skm.recall_score(y, pred), abs=1e-12)


@pytest.mark.parametrize(
    "function, y_true, second, match",
    [
        (metrics.sensitivity, [0, 0], [0, 1], "no positive"),
        (metrics.specificity, [1, 1], [1, 0], "no negative"),
        (metrics.precision, [0, 1], [0, 0], "predicted positive"),
        (metrics.npv, [0, 1], [1, 1], "predicted negative"),
        (metrics.f1, [0, 0], [0, 0], "none is predicted"),
        (metrics.balanced_accuracy, [1, 1], [1, 1], "only one class"),
        (metrics.roc_auc, [1, 1], [0.2, 0.3], "only one class"),
        (metrics.pr_auc, [0, 0], [0.2, 0.3], "only one class"),
    ],
)
def test_undefined_metric_is_nan_with_warning(function, y_true, second, match):
    with pytest.warns(UndefinedMetricWarning, match=match):
        value = function(y_true, second)
    assert math.isnan(value)


def test_defined_metrics_do_not_warn():
    y, prob = _random_case(7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = metrics.summarize(y, prob, 0.5)
    assert not any(isinstance(v, float) and math.isnan(v) for v in summary.values())


@pytest.mark.parametrize(
    "function, first, second, match",
    [
        (
            metrics.sensitivity,
            np.zeros((3, 2)),
            [0, 1, 1],
            r"y_true has shape \(3, 2\); expected a 1-D array",
        ),
        (metrics.accuracy, 1, 1, r"y_true has shape \(\); expected a 1-D array"),
        (metrics.roc_auc, [0, 1], np.full((2, 1), 0.5), r"y_prob has shape \(2, 1\); expected a 1-D"),
        (metrics.roc_auc, [0, 1, 1], [0.1, 0.2], r"y_true has shape \(3,\) but y_prob has shape \(2,\)"),
        (metrics.confusion_matrix, [0, 1], [0, 1, 1], r"y_pred has shape \(3,\)"),
        (metrics.brier, [], [], r"y_true has shape \(0,\); expected at least one value"),
        (metrics.confusion_matrix, [0, 2], [0, 1], r"only 0 \(NORMAL\) and 1 \(PNEUMONIA\); found \[2\]"),
        (metrics.f1, [0, 1], [0, 0.5], r"y_pred must hold only 0"),
        (metrics.roc_auc, ["a", "b"], [0.1, 0.2], r"y_true must hold only 0"),
        (metrics.brier, [0, 1], [0.5, 1.5], r"y_prob must lie in \[0, 1\]; found \[1.5\]"),
        (metrics.brier, [0, 1], [float("nan"), 0.5], r"y_prob must lie in \[0, 1\]"),
    ],
)
def test_bad_input_raises_value_error(function, first, second, match):
    with pytest.raises(ValueError, match=match):
        function(first, second)


SUMMARY_KEYS = [
    "n",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "balanced_accuracy",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
    "threshold",
    "confusion_matrix",
]


def test_summarize_keys_and_threshold_is_inclusive():
    y, prob = [0, 1, 0, 1], [0.3, 0.5, 0.5, 0.9]
    summary = metrics.summarize(y, prob, 0.5)
    assert list(summary) == SUMMARY_KEYS
    assert summary["confusion_matrix"] == {"tn": 1, "fp": 1, "fn": 0, "tp": 2}  # 0.5 >= 0.5
    assert summary["n"] == 4 and summary["threshold"] == 0.5
    assert summary["specificity"] == 0.5 and summary["roc_auc"] == pytest.approx(0.875)
    with pytest.raises(ValueError, match="threshold must lie in"):
        metrics.summarize(y, prob, 1.5)


def _clustered_case(seed: int = 0, patients: int = 300) -> tuple[np.ndarray, ...]:
    """Two images per patient sharing the label; scores correlated within a patient."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, patients)
    patient_score = rng.normal(0.4 + 0.25 * label, 0.15)
    groups = np.repeat(np.arange(patients), 2)
    prob = np.clip(patient_score[groups] + rng.normal(0, 0.05, groups.size), 0, 1)
    return label[groups], prob, groups


def test_bootstrap_interval_contains_point_estimate():
    y, prob, groups = _clustered_case()
    summary = metrics.summarize(y, prob, 0.5)
    intervals = metrics.bootstrap_ci(y, prob, 0.5, groups, n_resamples=500)
    assert list(intervals) == list(metrics.CI_METRICS)
    for metric, (low, high) in intervals.items():
        assert low <= summary[metric] <= high, metric
        assert 0 < high - low < 0.3, metric


def test_bootstrap_is_deterministic_per_seed():
    y, prob, groups = _clustered_case()
    first = metrics.bootstrap_ci(y, prob, 0.5, groups, n_resamples=200, seed=3)
    again = metrics.bootstrap_ci(y, prob, 0.5, groups, n_resamples=200, seed=3)
    other = metrics.bootstrap_ci(y, prob, 0.5, groups, n_resamples=200, seed=4)
    assert first == again
    assert first != other


def test_bootstrap_resamples_patients_not_images():
    # Each patient's two images are identical, so drawing patients gives exactly the
    # intervals of the one-image-per-patient data; drawing images would not.
    rng = np.random.default_rng(5)
    y, prob = rng.integers(0, 2, 80), rng.random(80)
    single = metrics.bootstrap_ci(y, prob, 0.5, np.arange(80), n_resamples=300, seed=1)
    twice = np.repeat(np.arange(80), 2)
    doubled = metrics.bootstrap_ci(y[twice], prob[twice], 0.5, twice, n_resamples=300, seed=1)
    for metric in metrics.CI_METRICS:
        assert doubled[metric] == pytest.approx(single[metric], abs=1e-12), metric


def test_group_weights_keep_patients_whole():
    groups = np.array(["p3", "p1", "p1", "p2", "p3", "p3"])  # sizes: p1 2, p2 1, p3 3
    weights = metrics._group_weights(groups, 50, np.random.default_rng(0))
    assert weights.shape == (50, 6)
    for patient, size in (("p1", 2), ("p2", 1), ("p3", 3)):
        columns = weights[:, groups == patient]
        assert columns.shape == (50, size)
        assert (columns == columns[:, :1]).all()  # one count for all images of a patient
    # Each resample draws as many patients as there are (3), so the counts per patient sum to 3.
    per_patient = weights[:, [1, 3, 0]]
    assert (per_patient.sum(axis=1) == 3).all()
    assert len({tuple(row) for row in per_patient}) > 1


def test_bootstrap_skips_undefined_resamples():
    # One NORMAL patient among ten: specificity is undefined whenever it is not drawn.
    y = np.array([0] + [1] * 9)
    prob = np.array([0.1] + [0.9] * 8 + [0.2])
    intervals = metrics.bootstrap_ci(y, prob, 0.5, np.arange(10), n_resamples=400)
    assert intervals["specificity"] == [1.0, 1.0]
    low, high = intervals["sensitivity"]
    assert 0.5 <= low < high <= 1.0


def test_bootstrap_all_undefined_gives_nan_pair():
    y, prob = np.ones(6, dtype=int), np.linspace(0.2, 0.9, 6)
    with pytest.warns(UndefinedMetricWarning) as record:
        intervals = metrics.bootstrap_ci(y, prob, 0.5, np.arange(6), n_resamples=50)
    warned = {str(w.message).split()[1] for w in record}
    assert warned == {"specificity", "balanced_accuracy", "roc_auc", "pr_auc"}
    assert all(math.isnan(v) for v in intervals["specificity"])
    assert all(math.isnan(v) for v in intervals["roc_auc"])
    assert not math.isnan(intervals["sensitivity"][0])


def test_bootstrap_narrower_at_lower_level():
    y, prob, groups = _clustered_case(1)
    wide = metrics.bootstrap_ci(y, prob, 0.5, groups, n_resamples=300, level=0.95)
    narrow = metrics.bootstrap_ci(y, prob, 0.5, groups, n_resamples=300, level=0.5)
    assert narrow["roc_auc"][1] - narrow["roc_auc"][0] < wide["roc_auc"][1] - wide["roc_auc"][0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": np.arange(5)}, r"y_true has shape \(600,\) but groups has shape \(5,\)"),
        ({"n_resamples": 0}, "n_resamples must be a positive integer"),
        ({"level": 1.0}, "level must lie strictly between 0 and 1"),
    ],
)
def test_bootstrap_rejects_bad_arguments(kwargs, match):
    y, prob, groups = _clustered_case()
    arguments = {"groups": groups, **kwargs}
    with pytest.raises(ValueError, match=match):
        metrics.bootstrap_ci(y, prob, 0.5, **arguments)


def test_to_json_safe_turns_nan_into_null():
    value = {
        "a": float("nan"),
        "b": [np.float32(1.5), np.inf, -np.inf],
        "c": np.int64(3),
        "d": {"e": np.float64("nan"), "f": (1, np.bool_(True))},
        "g": np.array([0.25, np.nan]),
    }
    text = json.dumps(metrics.to_json_safe(value), allow_nan=False)
    assert text == (
        '{"a": null, "b": [1.5, null, null], "c": 3, "d": {"e": null, "f": [1, true]}, "g": [0.25, null]}'
    )


def test_summary_of_one_class_serialises_with_nulls():
    with pytest.warns(UndefinedMetricWarning):
        summary = metrics.summarize([1, 1, 1], [0.2, 0.7, 0.9], 0.5)
    loaded = json.loads(json.dumps(metrics.to_json_safe(summary), allow_nan=False))
    assert loaded["roc_auc"] is None and loaded["specificity"] is None
    assert loaded["sensitivity"] == pytest.approx(2 / 3)


# ---- properties, for any input (hypothesis) --------------------------------------------------


@st.composite
def _labels_and_scores(draw, min_size: int = 2, max_size: int = 60):
    size = draw(st.integers(min_size, max_size))
    labels = draw(
        st.lists(st.integers(0, 1), min_size=size, max_size=size).filter(lambda v: 0 < sum(v) < len(v))
    )
    # Scores on a coarse grid as well as anywhere in [0, 1]: ties must be handled as sklearn does.
    scores = draw(
        st.lists(
            st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.floats(0.0, 1.0)),
            min_size=size,
            max_size=size,
        )
    )
    return np.array(labels), np.array(scores)


@settings(max_examples=60, deadline=None)
@given(_labels_and_scores())
def test_ranking_metrics_agree_with_sklearn_and_are_symmetric(case):
    y, prob = case
    assert metrics.roc_auc(y, prob) == pytest.approx(skm.roc_auc_score(y, prob), abs=1e-9)
    assert metrics.pr_auc(y, prob) == pytest.approx(skm.average_precision_score(y, prob), abs=1e-9)
    # Reversing the scores reverses the ranking: AUC(p) + AUC(1 - p) = 1, ties counted as halves.
    # On a grid of 1/64, where 1 - p is exact (near 0 it would round distinct scores into ties).
    grid = np.round(prob * 64) / 64
    assert metrics.roc_auc(y, grid) + metrics.roc_auc(y, 1.0 - grid) == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(_labels_and_scores(), st.floats(0.0, 1.0))
def test_summary_is_consistent_with_its_confusion_matrix(case, threshold):
    y, prob = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        summary = metrics.summarize(y, prob, threshold)
    cm = summary["confusion_matrix"]
    assert sum(cm.values()) == summary["n"] == len(y)
    assert cm["tp"] + cm["fn"] == y.sum() and cm["tp"] + cm["fp"] == (prob >= threshold).sum()
    assert summary["accuracy"] == pytest.approx((cm["tp"] + cm["tn"]) / len(y))
    assert summary["sensitivity"] == pytest.approx(cm["tp"] / y.sum())
    assert summary["specificity"] == pytest.approx(cm["tn"] / (len(y) - y.sum()))
    assert summary["balanced_accuracy"] == pytest.approx(
        (summary["sensitivity"] + summary["specificity"]) / 2
    )


@settings(max_examples=25, deadline=None)
@given(_labels_and_scores(min_size=6, max_size=40), st.integers(0, 2**16))
def test_bootstrap_intervals_are_ordered_and_repeatable(case, seed):
    y, prob = case
    groups = np.arange(len(y)) // 2  # pairs of images per patient
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        first = metrics.bootstrap_ci(y, prob, 0.5, groups, n_resamples=50, seed=seed)
        again = metrics.bootstrap_ci(y, prob, 0.5, groups, n_resamples=50, seed=seed)
    np.testing.assert_equal(first, again)  # NaN (an undefined resample) equals NaN here
    for low, high in first.values():
        assert (low is None and high is None) or (math.isnan(low) and math.isnan(high)) or low <= high


@pytest.mark.parametrize(
    "values, level, expected",
    [
        (np.arange(101.0), 0.95, [2.5, 97.5]),
        (np.arange(101.0), 0.5, [25.0, 75.0]),
        ([np.nan, 1.0, 3.0, np.nan], 0.0, [2.0, 2.0]),  # undefined resamples are left out
        ([np.nan, np.nan], 0.95, [np.nan, np.nan]),
    ],
)
def test_percentile_interval_by_hand(values, level, expected):
    from pneumoscan.metrics import percentile_interval

    np.testing.assert_allclose(percentile_interval(values, level), expected)


# ---- intervals that hold at small counts (issue 23) ---------------------------------------


@pytest.mark.parametrize(
    "successes, total, expected",
    [
        # Hand-computed with the Wilson formula, z = 1.959964; the exact (Clopper-Pearson)
        # interval for 8/8 is [0.631, 1], the percentile bootstrap's [1, 1].
        (8, 8, [0.675592, 1.0]),
        (0, 8, [0.0, 0.324408]),
        (7, 8, [0.529112, 0.977583]),
        (50, 100, [0.403832, 0.596168]),
    ],
)
def test_wilson_interval_against_hand_computed_values(successes, total, expected):
    assert metrics.wilson_interval(successes, total) == pytest.approx(expected, abs=1e-6)


def test_wilson_interval_refuses_impossible_counts_and_has_none_for_no_cases():
    with pytest.raises(ValueError, match="9 of 8"):
        metrics.wilson_interval(9, 8)
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))


def test_a_collapsed_bootstrap_is_widened_for_proportions_and_counted():
    """8 of 8 right in each class: the percentile bootstrap says [1, 1]; the proportions take in
    their Wilson interval, balanced accuracy the mean of its parts', and n is each denominator."""
    cm = {"tn": 8, "fp": 0, "fn": 0, "tp": 8}
    labels = np.array([0] * 8 + [1] * 8)
    probs = np.where(labels == 1, 0.9, 0.1)
    bootstrap = metrics.bootstrap_ci(labels, probs, 0.5, groups=np.arange(16), n_resamples=200)
    assert bootstrap["sensitivity"] == [1.0, 1.0]  # what the issue saw
    intervals = metrics.small_sample_intervals(bootstrap, cm)
    for name in ("sensitivity", "specificity", "precision", "npv"):
        assert intervals[name] == pytest.approx([0.675592, 1.0], abs=1e-6), name
    assert intervals["accuracy"] == pytest.approx(metrics.wilson_interval(16, 16), abs=1e-12)
    assert intervals["balanced_accuracy"] == pytest.approx([0.675592, 1.0], abs=1e-6)
    assert metrics.collapsed(intervals["roc_auc"]) and not metrics.collapsed(intervals["accuracy"])
    counts = metrics.interval_counts({"tn": 5, "fp": 3, "fn": 1, "tp": 7})
    assert counts == {
        "accuracy": 16,
        "sensitivity": 8,
        "specificity": 8,
        "precision": 10,
        "npv": 6,
        "f1": 16,
        "balanced_accuracy": 16,
        "roc_auc": 16,
        "pr_auc": 16,
    }
    wide = {name: [0.0, 1.0] for name in metrics.CI_METRICS}  # a wider bootstrap is kept
    assert metrics.small_sample_intervals(wide, cm)["sensitivity"] == [0.0, 1.0]
