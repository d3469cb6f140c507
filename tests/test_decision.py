"""pneumoscan.decision: the fitted blocks of metadata.json read once into types, one verdict for
a batch, each block fitted once, and the blocks written back as they were read."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest

from conftest import SAMPLES
from pneumoscan import calibrate, decision, ood
from pneumoscan.bundle import bundled_dir
from pneumoscan.cli import main
from pneumoscan.config import ThresholdRule
from pneumoscan.metadata import MetadataError, read

NAMES = ("NORMAL", "PNEUMONIA")


@pytest.fixture(scope="module")
def bundled_meta() -> dict:
    return read(bundled_dir())


def small_meta(slope=1.0, intercept=0.0, threshold=0.5, band=None, ood_block=None) -> dict:
    meta = {
        "class_names": list(NAMES),
        "calibration": {"method": "platt", "slope": slope, "intercept": intercept, "fitted_on": "val"},
        "threshold": {"value": threshold, "rule": "fixed:0.5", "split": None, "applies_to": "calibrated"},
    }
    if band is not None:
        meta["borderline"] = {"low": band[0], "high": band[1]}
    if ood_block is not None:
        meta["ood"] = ood_block
    return meta


def identity_block(threshold: float) -> dict:
    """An `ood` block on 2 features: d2 = |f|^2 (zero mean, unit variances), colourfulness
    threshold 15, aspect threshold 3."""
    return {
        "feature_layer": "features",
        "feature_pooling": "none",
        "mahalanobis": {
            "mean": ood.pack(np.zeros(2)),
            "components": ood.pack(np.eye(2)),
            "variances": [1.0, 1.0],
            "residual_variance": 1.0,
            "threshold": threshold,
        },
        "colourfulness": {"threshold": 15.0},
        "aspect": {"threshold": 3.0},
    }


def test_the_bundled_blocks_round_trip_unchanged(bundled_meta):
    read_once = decision.Decision.from_metadata(bundled_meta)
    assert decision.with_decision(bundled_meta, read_once) == bundled_meta
    assert read_once.threshold == bundled_meta["threshold"]["value"]
    assert (read_once.band.low, read_once.band.high) == (
        bundled_meta["borderline"]["low"],
        bundled_meta["borderline"]["high"],
    )
    assert read_once.feature_layer == bundled_meta["ood"]["feature_layer"]


def test_a_model_without_the_optional_blocks_gets_plain_verdicts():
    rule = decision.Decision.from_metadata(small_meta())
    (verdict,) = rule.apply(np.float32([0.7]))
    assert verdict.record() == {"label": "PNEUMONIA", "probability": verdict.probability, "threshold": 0.5}
    assert rule.band is None and rule.ood is None and rule.feature_layer is None


def test_labels_probabilities_and_band_of_a_batch():
    meta = small_meta(slope=2.0, intercept=-1.0, threshold=0.6, band=(0.4, 0.8))
    rule = decision.Decision.from_metadata(meta)
    raw = np.float32([0.1, 0.5, 0.62, 0.7, 0.9999])
    verdicts = rule.apply(raw)
    # Worked out here: sigmoid(2 logit(p) - 1).
    expected = [1 / (1 + math.exp(-(2 * math.log(float(p) / (1 - float(p))) - 1))) for p in raw]
    for verdict, p in zip(verdicts, expected, strict=True):
        assert verdict.probability == pytest.approx(p, rel=1e-12)
        assert verdict.label == ("PNEUMONIA" if p >= 0.6 else "NORMAL")
        assert verdict.borderline == (0.4 < p < 0.8)
        assert verdict.threshold == 0.6 and verdict.ood is None and verdict.ood_score is None


def test_a_probability_exactly_at_the_threshold_is_positive():
    rule = decision.Decision.from_metadata(small_meta(threshold=0.5))
    assert rule.label(0.5) == "PNEUMONIA" and rule.label(np.nextafter(0.5, 0.0)) == "NORMAL"


def test_the_ood_flag_is_a_score_above_one():
    rule = decision.Decision.from_metadata(small_meta(ood_block=identity_block(threshold=4.0)))
    features = np.array([[2.0, 0.0], [1.0, 0.0], [2.0, 0.125], [0.0, 0.0], [0.0, 0.0]])
    checks = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [15.0, 1.0], [0.0, 3.5]])
    verdicts = rule.apply(np.float32([0.5] * 5), features, checks)
    # d2 / 4, colourfulness / 15, (aspect - 1) / 2: the largest part.
    scores = [1.0, 0.25, (4.0 + 0.125**2) / 4.0, 1.0, 1.25]  # float32 features: exact here
    assert [v.ood_score for v in verdicts] == pytest.approx(scores, rel=1e-12)
    assert [v.ood for v in verdicts] == [False, False, True, False, True]
    record = verdicts[2].record()
    assert list(record) == ["label", "probability", "threshold", "ood", "ood_score"]


def test_a_band_reaching_one_takes_in_the_probabilities_the_clip_merges():
    rule = decision.Decision.from_metadata(small_meta(slope=3.0, band=(0.0, 1.0)))
    verdicts = rule.apply(np.float32([0.0, 1e-9, 0.5, 1.0 - 1e-7, 1.0]))
    assert verdicts[-1].probability == pytest.approx(1.0) and all(v.borderline for v in verdicts)


def test_a_broken_band_or_calibration_is_refused_on_reading():
    with pytest.raises(MetadataError, match=r"^M/metadata.json: borderline needs 0 <= low <= high <= 1"):
        decision.Decision.from_metadata(small_meta(band=(0.7, 0.3)), "M/metadata.json")
    broken = small_meta()
    broken["calibration"]["method"] = "isotonic"
    with pytest.raises(ValueError, match="calibration method 'isotonic' is unknown"):
        decision.Decision.from_metadata(broken)


def test_predict_refuses_a_model_whose_decision_cannot_be_applied(tmp_path, capsys):
    """One sentence naming the file, exit 1, before any film is read; it was an "unexpected
    error" raised at the first film."""
    model = tmp_path / "model"
    shutil.copytree(bundled_dir(), model)
    meta = read(model)
    meta["calibration"] = {"method": "none", "slope": 1.5, "intercept": 0.0, "fitted_on": None}
    (model / "metadata.json").write_text(json.dumps(meta))
    image = next(SAMPLES.rglob("*.jpeg"))
    assert main(["predict", "--model", str(model), str(image)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        f"pneumoscan: error: {model / 'metadata.json'}: calibration method 'none' needs slope 1 and "
        "intercept 0; got 1.5, 0.0."
    )


# ---- fitting: each block once ----------------------------------------------------------------


def split_arrays(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    raw = 1.0 / (1.0 + np.exp(-(3.0 * (labels - 0.5) + rng.normal(0, 1.5, n))))
    return labels, raw.astype(np.float32)


def test_fit_with_a_rule_fits_calibration_threshold_metrics_and_band():
    labels, raw = split_arrays(5)
    rule = ThresholdRule.parse("sensitivity:0.9")
    fitted, metrics = decision.fit_decision(labels, raw, rule)
    reference = calibrate.fit_operating_point(labels, raw, rule)
    blocks = fitted.blocks()
    assert blocks["calibration"] == reference["calibration"] and blocks["threshold"] == reference["threshold"]
    assert blocks["borderline"] == reference["borderline"] and metrics == reference["metrics"]
    assert blocks["borderline"]["threshold"] == fitted.threshold and "ood" not in blocks
    # The band counts what apply flags on the split it was fitted on.
    inside = sum(v.borderline for v in fitted.apply(raw))
    assert inside == blocks["borderline"]["val"]["inside"]


def test_fit_without_a_rule_keeps_calibration_and_threshold_and_refits_the_band():
    labels, raw = split_arrays(6)
    meta = small_meta(slope=1.1, intercept=0.2, threshold=0.4, band=(0.1, 0.9))
    current = decision.Decision.from_metadata(meta)
    fitted, metrics = decision.fit_decision(labels, raw, None, current=current)
    assert metrics is None
    assert fitted.calibration == current.calibration and fitted.threshold_block == current.threshold_block
    band = calibrate.fit_borderline(labels, current.probabilities(raw), 0.4)
    assert fitted.band.block == band and (fitted.band.low, fitted.band.high) == (band["low"], band["high"])


def test_fit_with_features_fits_the_ood_block_as_ood_fit_does():
    labels, raw = split_arrays(7, n=300)
    rng = np.random.default_rng(8)
    train, val = rng.normal(size=(500, 6)), rng.normal(size=(300, 6))
    checks = np.tile([0.0, 1.0], (300, 1))
    trust = decision.TrustInputs(train, val, checks, ("features", "none"))
    fitted, _ = decision.fit_decision(labels, raw, ThresholdRule.parse("youden"), trust=trust)
    assert json.dumps(fitted.ood.block) == json.dumps(ood.fit(train, val, checks, ("features", "none")))
    flagged = [v.ood for v in fitted.apply(raw, val, checks)]
    assert np.mean(flagged) == fitted.ood.block["false_alarm_rate"]["val"]


def test_fit_needs_a_rule_or_the_current_decision():
    labels, raw = split_arrays(9)
    with pytest.raises(ValueError, match="needs a threshold rule or the current decision"):
        decision.fit_decision(labels, raw, None)


def test_with_decision_writes_metrics_under_the_split_and_keeps_the_rest(bundled_meta):
    labels, raw = split_arrays(10)
    fitted, metrics = decision.fit_decision(labels, raw, ThresholdRule.parse("youden"))
    meta = copy.deepcopy(bundled_meta)
    updated = decision.with_decision(meta, fitted, metrics)
    assert updated["metrics"]["val"] == metrics and updated["threshold"] == fitted.threshold_block
    assert updated["ood"] == bundled_meta["ood"]  # a decision without an ood block leaves it
    refitted = ("calibration", "threshold", "borderline", "metrics")
    assert {k: v for k, v in updated.items() if k not in refitted} == {
        k: v for k, v in bundled_meta.items() if k not in refitted
    }
    assert meta == bundled_meta  # not changed in place


def test_describe_says_how_the_threshold_was_chosen(bundled_meta):
    lines = decision.Decision.from_metadata(bundled_meta).describe().splitlines()
    assert lines[0] == (
        "Calibration: platt: slope 1.304, intercept 1.138; threshold 0.9412 (sensitivity:0.9, chosen on val)."
    )
    assert lines[1].startswith("Out-of-distribution flag: Mahalanobis d2 threshold")
    fixed = decision.Decision.from_metadata(small_meta())
    expected = "Calibration: platt: slope 1.000, intercept 0.000; threshold 0.5000 (fixed:0.5)."
    assert fixed.describe() == expected
