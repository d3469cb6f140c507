"""The page's decision (web/decision.js, run in Node) against pneumoscan.decision: exp, log, the
logit, the sigmoid and the calibrated probability bit for bit over many arguments, and whole
verdicts (label, probability, band, out-of-distribution flag and score) on tables built to sit
at the threshold, at the band's edges and at a score of exactly 1.

One Node process (tests/js/units.mjs) answers every call of the module.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest

from conftest import needs_node
from pneumoscan import calibrate, decision, ood
from pneumoscan.bundle import bundled_dir
from pneumoscan.metadata import read

pytestmark = needs_node


@pytest.fixture(scope="module")
def page(page_units):
    """tests/js/units.mjs, its answers checked for errors."""

    class Page:
        @staticmethod
        def call(name: str, **arguments) -> dict:
            answer = page_units.call(name, **arguments)
            assert "error" not in answer, answer
            return answer

    return Page()


def pack(values) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f8").tobytes()).decode("ascii")


def unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f8")


def bits_differ(a: np.ndarray, b: np.ndarray) -> int:
    return int((np.asarray(a, np.float64).view(np.uint64) != np.asarray(b, np.float64).view(np.uint64)).sum())


RNG = np.random.default_rng(20)
# Logits as calibration meets them: everywhere, near 0 (where the two sigmoid branches meet) and
# out to where exp underflows; the signs of zero too.
EDGES = [0.0, -0.0, 1e-300, -1e-300, 5e-324, 36.7, 37.5, -745.1, -745.2, 709.8]
LOGITS = np.concatenate(
    [RNG.uniform(-40, 40, 100_000), RNG.normal(0, 2, 100_000), RNG.uniform(-800, 800, 2_000), EDGES]
)


def test_exp_is_pythons_bit_for_bit(page):
    x = -np.abs(LOGITS)
    assert bits_differ(unpack(page.call("exactExp", x=pack(x))["y"]), calibrate.exact_exp(x)) == 0
    x = np.concatenate([LOGITS, [710.0, np.inf, -np.inf]])
    assert bits_differ(unpack(page.call("exactExp", x=pack(x))["y"]), calibrate.exact_exp(x)) == 0


def test_log_is_pythons_bit_for_bit(page):
    q = np.concatenate([RNG.uniform(1e-7, 1 - 1e-7, 100_000), 10.0 ** RNG.uniform(-7, 0, 50_000)])
    edges = [1.0, 1 - 2**-40, 1 + 2**-40, 1e-7, 1e7, 2.0, 0.5, 5e-324, 1e-310, 1.7e308]
    x = np.concatenate([q / (1 - q), edges, 10.0 ** RNG.uniform(-320, 308, 20_000)])
    assert bits_differ(unpack(page.call("exactLog", x=pack(x))["y"]), calibrate.exact_log(x)) == 0
    specials = np.array([0.0, -0.0, np.inf, np.nan, -1.0])
    np.testing.assert_array_equal(
        unpack(page.call("exactLog", x=pack(specials))["y"]), calibrate.exact_log(specials)
    )


def test_logit_and_sigmoid_are_pythons_bit_for_bit(page):
    p = np.concatenate([RNG.uniform(0, 1, 100_000), 10.0 ** RNG.uniform(-12, 0, 20_000), [0.0, 1.0, 0.5]])
    p = np.concatenate([p, 1 - p])
    assert bits_differ(unpack(page.call("logit", x=pack(p))["y"]), calibrate.logit(p)) == 0
    assert bits_differ(unpack(page.call("sigmoid", x=pack(LOGITS))["y"]), calibrate._sigmoid(LOGITS)) == 0


@pytest.mark.parametrize(
    "slope, intercept",
    [(1.0, 0.0), (1.3225186526157098, 1.2839116411705005), (0.37, -2.5), (3.1, -0.2), (-1.5, 0.4)],
)
def test_calibrated_probability_is_pythons_bit_for_bit(page, slope, intercept):
    """Float32 raw outputs, as the model gives them, over the whole range and below 0.5, where the
    two sides used different formulas (e / (1 + e) against 1 / (1 + exp(-z)))."""
    raw = np.concatenate([RNG.uniform(0, 1, 50_000), 10.0 ** RNG.uniform(-9, 0, 20_000), [0.0, 1.0]])
    raw = np.concatenate([raw, 1 - raw]).astype(np.float32).astype(np.float64)
    calibration = {"method": "platt", "slope": slope, "intercept": intercept, "fitted_on": "val"}
    page_p = unpack(
        page.call("calibrate", p=pack(raw), calibration={"slope": slope, "intercept": intercept})["y"]
    )
    assert bits_differ(page_p, calibrate.apply_calibration(raw, calibration)) == 0


@pytest.mark.parametrize("pooling", ["mean_std", "sqrt_mean_std", "none"])
def test_pooled_features_are_pythons(page, pooling):
    """A feature map as the model gives it (float32, ReLU zeros, and negatives, which
    sqrt_mean_std clips to 0) pooled on both sides: the same float64 numbers up to the order of
    summation."""
    maps = RNG.gamma(0.6, 1.0, (5, 5, 160)).astype(np.float32)
    maps[maps < 0.3] = 0.0
    maps[0, :, :3] = -RNG.uniform(0, 1, (5, 3))
    raw = base64.b64encode(np.ascontiguousarray(maps, dtype="<f4").tobytes()).decode("ascii")
    got = unpack(page.call("poolFeatures", values=raw, shape=list(maps.shape), pooling=pooling)["y"])
    want = ood.features(maps[None], pooling)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def _meta_with(threshold: float, band: tuple[float, float], d2_threshold: float) -> dict:
    meta = read(bundled_dir())
    meta["threshold"] = {**meta["threshold"], "value": threshold}
    meta["borderline"] = {**meta["borderline"], "low": band[0], "high": band[1]}
    meta["ood"] = {
        "feature_layer": "features",
        "feature_pooling": "none",
        "mahalanobis": {
            "mean": ood.pack(np.zeros(3)),
            "components": ood.pack(np.eye(2, 3)),
            "variances": [1.0, 4.0],
            "residual_variance": 0.25,
            "threshold": d2_threshold,
        },
        "colourfulness": {"threshold": 15.0},
        "aspect": {"threshold": 3.0},
    }
    return meta


def test_verdicts_match_python_at_the_threshold_band_edges_and_a_score_of_one(page):
    """Raw outputs whose calibrated probabilities are the threshold and the band's edges exactly,
    and the float64 numbers beside them; features whose score is exactly 1 and just above."""
    meta = read(bundled_dir())
    rule = decision.Decision.from_metadata(meta)
    raw = np.concatenate([RNG.uniform(0, 1, 3000), [0.0, 1.0]]).astype(np.float32).astype(np.float64)
    probabilities = rule.probabilities(raw)
    # The threshold and band edges at calibrated probabilities the data really give, below 0.5 too.
    picks = probabilities[[5, 17, 400]]
    threshold, low, high = np.sort(picks)[1], np.sort(picks)[0], np.sort(picks)[2]
    meta = _meta_with(float(threshold), (float(low), float(high)), d2_threshold=4.0)
    rule = decision.Decision.from_metadata(meta)
    features = np.zeros((raw.size, 3), np.float32)
    features[:4] = [
        [2.0, 0.0, 0.0],
        [2.0, 0.0, 0.125],
        [0.0, 4.0, 0.0],
        [0.0, 0.0, 1.0],
    ]  # d2: 4, 4.0625, 4, 4
    checks = np.tile([0.0, 1.0], (raw.size, 1))
    checks[4:7] = [[15.0, 1.0], [15.000001, 1.0], [0.0, 3.0]]  # colourfulness and aspect at 1
    expected = rule.apply(raw, features, checks)
    answer = page.call(
        "verdicts", metadata=meta, p=pack(raw), features=features.tolist(), checks=checks.tolist()
    )["verdicts"]
    assert len(answer) == len(expected)
    for got, want in zip(answer, expected, strict=True):
        assert bits_differ(unpack(got["probability"]), [want.probability]) == 0
        assert bits_differ(unpack(got["oodScore"]), [want.ood_score]) == 0
        assert (got["label"], got["borderline"], got["ood"]) == (want.label, want.borderline, want.ood)
        assert got["threshold"] == want.threshold
    assert [v.ood for v in expected[:7]] == [False, True, False, False, False, True, False]
    # The threshold and edges themselves were met: positive at the threshold, outside at an edge.
    at = {float(v.probability): v for v in expected}
    assert at[float(threshold)].label == "PNEUMONIA" and at[float(low)].borderline is False


def test_a_band_of_every_image_flags_the_same_films_on_both_sides(page):
    meta = _meta_with(0.5, (0.0, 1.0), d2_threshold=4.0)
    del meta["ood"]
    raw = np.array([0.0, 1e-12, 0.5, 1 - 1e-7, 1.0], np.float32).astype(np.float64)
    rule = decision.Decision.from_metadata(meta)
    answer = page.call("verdicts", metadata=meta, p=pack(raw), features=None, checks=None)["verdicts"]
    assert [v["borderline"] for v in answer] == [v.borderline for v in rule.apply(raw)] == [True] * 5
