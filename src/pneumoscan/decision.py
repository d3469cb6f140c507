"""The verdict on a film: calibration, threshold, borderline band and out-of-distribution rule,
read once from metadata.json into types and applied in one place (`Decision.apply`), and fitted
once (`fit_decision`). `predict`, `evaluate`, `explain`, `train`, `threshold` and `ood` all go
through here; the page's twin is web/decision.js, which follows the same formulas
(docs/metadata.md, "Calibration and decision", "Borderline answers", "Out-of-distribution flag").

- `Decision.from_metadata(meta)`: the fitted blocks as types, checked once;
- `Decision.apply(raw, layer_output, checks)`: `Verdict`s (label, probability, threshold,
  borderline, ood, ood_score) for a batch of raw model outputs;
- `fit_decision(labels, raw, rule, ...)`: calibration and threshold (when a rule is given), the
  borderline band, and the out-of-distribution statistics (when features are given), each
  fitted once; `fit_on_splits` runs a model over training's train and val splits for it;
- `with_decision(meta, decision)`: the blocks written back into metadata.

The arithmetic lives in `calibrate` (the fits and the calibrated probability, written out in
float64 so the page agrees bit for bit) and `ood` (the distance maths).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumoscan import ood as ood_maths
from pneumoscan.calibrate import (
    apply_calibration,
    describe_calibration,
    fit_borderline,
    fit_operating_point,
    in_band,
)
from pneumoscan.config import CLASS_NAMES, ThresholdRule
from pneumoscan.metadata import FILE_NAME, MetadataError

OOD_ABOVE = 1.0  # ood = ood_score > 1: each part is 1 at its own threshold (`ood.RULE`)


@dataclass(frozen=True)
class Calibration:
    """metadata.json's `calibration`: sigmoid(slope · logit(p) + intercept)."""

    block: dict

    @classmethod
    def from_block(cls, block: dict) -> Calibration:
        """Raises ValueError: an unknown method or parameters that do not fit it."""
        apply_calibration(0.5, block)  # the one check of the block, as every apply makes it
        return cls(dict(block))

    def apply(self, raw: Any) -> np.ndarray:
        """Calibrated probabilities, float64, of raw model outputs (any shape)."""
        return apply_calibration(raw, self.block)


@dataclass(frozen=True)
class Band:
    """metadata.json's `borderline`: borderline = low < probability < high (`calibrate.in_band`)."""

    low: float
    high: float
    block: dict

    @classmethod
    def from_block(cls, block: dict) -> Band:
        """Raises ValueError: bounds that are not 0 <= low <= high <= 1."""
        low, high = block["low"], block["high"]
        if not (_finite(low) and _finite(high) and 0.0 <= low <= high <= 1.0):
            raise ValueError(f"borderline needs 0 <= low <= high <= 1; got {low!r}, {high!r}")
        return cls(float(low), float(high), dict(block))

    def contains(self, probability: Any) -> np.ndarray:
        return in_band(probability, self.low, self.high)


@dataclass(frozen=True)
class OodRule:
    """metadata.json's `ood`: ood_score from the feature layer's output and the image checks."""

    block: dict

    @property
    def feature_layer(self) -> str:
        return self.block["feature_layer"]

    def scores(self, layer_output: np.ndarray, checks: np.ndarray) -> np.ndarray:
        """ood_score, float64 (n,), from the feature layer's output (n, ...) and the (n, 2)
        [colourfulness, aspect] of the decoded images."""
        pooled = ood_maths.features(layer_output, self.block["feature_pooling"])
        return ood_maths.scores(self.block, pooled, checks)

    @staticmethod
    def flags(scores: Any) -> np.ndarray:
        return np.asarray(scores, dtype=np.float64) > OOD_ABOVE


@dataclass(frozen=True)
class Verdict:
    """What a film gets: the label at the threshold, the calibrated probability, and, when the
    model has those blocks, whether it is borderline and how far it lies from the training X-rays."""

    label: str
    probability: float
    threshold: float
    borderline: bool | None = None
    ood: bool | None = None
    ood_score: float | None = None

    def record(self) -> dict[str, Any]:
        """`predict`'s record fields, in its order: label, probability, threshold, then
        borderline and ood, ood_score when the model has those blocks."""
        record: dict[str, Any] = {"label": self.label, "probability": self.probability}
        record["threshold"] = self.threshold
        if self.borderline is not None:
            record["borderline"] = self.borderline
        if self.ood_score is not None:
            record.update(ood=self.ood, ood_score=self.ood_score)
        return record


@dataclass(frozen=True)
class Decision:
    """The fitted blocks of one model's metadata.json, as types."""

    class_names: tuple[str, str]
    calibration: Calibration
    threshold_block: dict
    band: Band | None = None
    ood: OodRule | None = None

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], source: str = FILE_NAME) -> Decision:
        """The decision of a (validated) metadata.json; `borderline` and `ood` are optional.

        Raises:
            MetadataError: a calibration or band that cannot be applied, in one sentence naming
                `source`.
        """
        band, rule = metadata.get("borderline"), metadata.get("ood")
        try:
            calibration = Calibration.from_block(metadata["calibration"])
            band = None if band is None else Band.from_block(band)
        except ValueError as error:
            raise MetadataError(f"{source}: {error}.") from None
        return cls(
            tuple(metadata["class_names"]),
            calibration,
            dict(metadata["threshold"]),
            band,
            None if rule is None else OodRule(rule),
        )

    @property
    def threshold(self) -> float:
        return float(self.threshold_block["value"])

    @property
    def feature_layer(self) -> str | None:
        """The inner layer whose output the out-of-distribution score reads, if any."""
        return None if self.ood is None else self.ood.feature_layer

    def probabilities(self, raw: Any) -> np.ndarray:
        return self.calibration.apply(raw)

    def label(self, probability: float) -> str:
        """class_names[1] at or above the threshold, else class_names[0]."""
        return self.class_names[1] if probability >= self.threshold else self.class_names[0]

    def apply(self, raw: Any, layer_output: Any = None, checks: Any = None) -> list[Verdict]:
        """One `Verdict` per raw model output (n,). `layer_output` (the feature layer's, n x ...)
        and `checks` ((n, 2) [colourfulness, aspect]) give the out-of-distribution score; without
        them, or for a model without an `ood` block, verdicts carry none."""
        probabilities = np.atleast_1d(self.probabilities(raw))
        borderline = None if self.band is None else self.band.contains(probabilities)
        scores = None
        if self.ood is not None and layer_output is not None and checks is not None:
            scores = self.ood.scores(layer_output, checks)
        verdicts = []
        for i, probability in enumerate(probabilities.tolist()):
            score = None if scores is None else float(scores[i])
            verdicts.append(
                Verdict(
                    self.label(probability),
                    probability,
                    self.threshold,
                    None if borderline is None else bool(borderline[i]),
                    None if score is None else bool(OodRule.flags(score)),
                    score,
                )
            )
        return verdicts

    def blocks(self) -> dict[str, Any]:
        """The metadata.json blocks of this decision."""
        blocks: dict[str, Any] = {"calibration": self.calibration.block, "threshold": self.threshold_block}
        if self.band is not None:
            blocks["borderline"] = self.band.block
        if self.ood is not None:
            blocks["ood"] = self.ood.block
        return blocks

    def describe(self) -> str:
        """Lines for logs: calibration and threshold; the flag and the band when present."""
        t = self.threshold_block
        chosen = f", chosen on {t['split']}" if t.get("split") else ""
        lines = [
            f"Calibration: {describe_calibration(self.calibration.block)}; threshold {t['value']:.4f} "
            f"({t['rule']}{chosen})."
        ]
        if self.ood is not None and self.band is not None:
            lines.append(describe_trust(self.blocks()))
        return "\n".join(lines)


def with_decision(
    metadata: dict[str, Any], decision: Decision, metrics: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A copy of `metadata` with the decision's blocks, and `metrics` (of the split calibration
    and threshold were fitted on) under `metrics.<split>` when given."""
    updated = {**metadata, **decision.blocks()}
    if metrics is not None:
        split = decision.threshold_block.get("split") or decision.calibration.block.get("fitted_on")
        updated["metrics"] = {**metadata.get("metrics", {}), split: metrics}
    return updated


@dataclass(frozen=True)
class TrustInputs:
    """What the out-of-distribution fit needs: pooled features of the train and val X-rays, the
    val images' [colourfulness, aspect], and (feature layer, pooling)."""

    train_features: np.ndarray
    val_features: np.ndarray
    val_checks: np.ndarray
    source: tuple[str, str]


def fit_decision(
    labels: Any,
    raw: Any,
    rule: ThresholdRule | None,
    *,
    current: Decision | None = None,
    trust: TrustInputs | None = None,
    split: str = "val",
) -> tuple[Decision, dict[str, Any] | None]:
    """Fit the decision on a split's labels and raw model outputs, each block once.

    With `rule`: Platt calibration, the threshold by `rule` and the split's metrics at it
    (`calibrate.fit_operating_point`); without, `current`'s calibration and threshold, and no
    metrics. Then the borderline band around that threshold, and the out-of-distribution block
    from `trust` (else `current`'s, or none).

    Returns:
        (the decision, the split's metrics or None).

    Raises:
        ValueError: one class only, bad shapes or values, or neither `rule` nor `current`.
    """
    if rule is None and current is None:
        raise ValueError("fit_decision needs a threshold rule or the current decision")
    names = current.class_names if current is not None else tuple(CLASS_NAMES)
    metrics = None
    if rule is not None:
        fitted = fit_operating_point(labels, raw, rule, split=split)  # its band is the one kept
        calibration, threshold, metrics, band = (
            Calibration(fitted["calibration"]),
            fitted["threshold"],
            fitted["metrics"],
            fitted["borderline"],
        )
    else:
        calibration, threshold = current.calibration, current.threshold_block
        band = fit_borderline(labels, calibration.apply(raw), float(threshold["value"]), split=split)
    if trust is not None:
        block = ood_maths.fit(trust.train_features, trust.val_features, trust.val_checks, trust.source)
        ood_rule: OodRule | None = OodRule(block)
    else:
        ood_rule = current.ood if current is not None else None
    return Decision(names, calibration, dict(threshold), Band.from_block(band), ood_rule), metrics


def fit_on_splits(
    bundle: Any,
    train: Sequence[Any] | None,
    val: Sequence[Any],
    batch_size: int,
    rule: ThresholdRule | None = None,
) -> tuple[Decision, dict[str, Any] | None]:
    """`fit_decision` on a model's val split (and train split for the out-of-distribution
    statistics; None keeps the current block): `bundle` is a `Bundle` (its metadata the model's
    so far), the splits `data.Sample`s scanned at the model's input size. Each split runs through
    the model once.

    With `rule`, calibration and threshold are refitted (training, `pneumoscan threshold`); without,
    the current ones stay (`pneumoscan ood`).
    """
    from pneumoscan.data import inputs

    current = Decision.from_metadata(bundle.metadata)
    labels = [s.label for s in val]
    trust = None
    if train is None:
        raw, _ = bundle.forward_features(inputs(list(val)), batch_size)
    else:
        layer, pooling = source = feature_source(bundle.model)
        _, train_output = bundle.forward_features(inputs(list(train)), batch_size, layer)
        raw, val_output = bundle.forward_features(inputs(list(val)), batch_size, layer)
        trust = TrustInputs(
            ood_maths.features(train_output, pooling),
            ood_maths.features(val_output, pooling),
            ood_maths.sample_checks(val),
            source,
        )
    return fit_decision(
        labels,
        raw,
        rule,
        current=current,
        trust=trust,
    )


def feature_source(model: Any) -> tuple[str, str]:
    """(layer name, pooling) of the out-of-distribution features (`pneumoscan.ood`): the feature
    map that global average pooling reduces and `ood.MAP_POOLING` (pneumonet: `stage3_out`), when the
    output layer is fed by such a pooling, past any dropout; else the layer feeding the output
    layer and "none" (the seed CNN: `dense`)."""
    import keras

    layer = model.layers[-1]
    while True:
        inbound = layer.input
        source = next(candidate for candidate in model.layers if candidate.output is inbound)
        if isinstance(source, keras.layers.GlobalAveragePooling2D):
            pooled = next(candidate for candidate in model.layers if candidate.output is source.input)
            return pooled.name, ood_maths.MAP_POOLING
        if not isinstance(source, keras.layers.Dropout):
            return source.name, "none"
        layer = source


def describe_trust(metadata: dict[str, Any]) -> str:
    """One line for logs: the out-of-distribution threshold and val false alarms, and the
    borderline band."""
    block, band = metadata["ood"], metadata["borderline"]
    rate = block["false_alarm_rate"]
    return (
        f"Out-of-distribution flag: Mahalanobis d2 threshold {block['mahalanobis']['threshold']:.1f} "
        f"({block['mahalanobis']['threshold_rule']}), {rate['val']:.2%} of {rate['n']} val X-rays "
        f"flagged; borderline band ({band['low']:.3f}, {band['high']:.3f}) around the threshold, "
        f"val error outside it {band[band['split']]['error_rate_outside'] or 0:.2%}."
    )


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
