"""The one configuration object: `pneumoscan train` builds it, every stage reads it.

A run writes the resolved configuration to `RUN_DIR/config.json`; the same command on the
same folder compares against it to resume, or to refuse a changed configuration.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
SCHEDULES = ("plateau", "cosine")
POSITIVE_CLASS = "PNEUMONIA"


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only augmentation; factors follow Keras' preprocessing layers."""

    rotation_degrees: float = 7.0
    zoom: float = 0.1
    shift: float = 0.08
    brightness: float = 0.1
    contrast: float = 0.1


@dataclass(frozen=True)
class Config:
    """Every hyper-parameter of a run.

    A recipe field left at None takes the architecture's own value (`model.ARCHITECTURES`,
    `recipe`) in `resolved()`; the resolved configuration is what a run records.
    """

    arch: str = "pneumonet"
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    schedule: str | None = None  # "plateau" (reduce on plateau) or "cosine" (warm-up + cosine)
    warmup_epochs: int | None = None
    weight_decay: float | None = None  # decoupled (AdamW) when > 0
    label_smoothing: float | None = None
    early_stopping_patience: int | None = None
    seed: int = 1337
    val_fraction: float = 0.1
    internal_test_fraction: float = 0.1
    class_weights: bool = True
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    min_learning_rate: float = 1e-6
    threshold_rule: str = "youden"
    augment: AugmentConfig | None = None

    def __post_init__(self) -> None:
        def unset_or(value, ok) -> bool:
            return value is None or ok(value)

        checks = [
            (unset_or(self.epochs, lambda v: v >= 1), f"epochs must be at least 1, got {self.epochs}"),
            (
                unset_or(self.batch_size, lambda v: v >= 1),
                f"batch size must be at least 1, got {self.batch_size}",
            ),
            (
                unset_or(self.learning_rate, lambda v: v > 0),
                f"learning rate must be positive, got {self.learning_rate}",
            ),
            (
                unset_or(self.schedule, lambda v: v in SCHEDULES),
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
            ),
            (
                unset_or(self.label_smoothing, lambda v: 0 <= v < 0.5),
                f"label smoothing must be in [0, 0.5), got {self.label_smoothing}",
            ),
            (
                unset_or(self.weight_decay, lambda v: v >= 0),
                f"weight decay must be >= 0, got {self.weight_decay}",
            ),
            (0 < self.val_fraction < 0.5, f"val fraction must be in (0, 0.5), got {self.val_fraction}"),
            (
                0 < self.internal_test_fraction < 0.5,
                f"internal-test fraction must be in (0, 0.5), got {self.internal_test_fraction}",
            ),
            (
                self.image_size is None or 32 <= self.image_size <= 1024,
                f"image size must be between 32 and 1024, got {self.image_size}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        from pneumoscan.calibrate import parse_threshold_rule

        parse_threshold_rule(self.threshold_rule)  # refuse a bad rule before training, not after

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        values = dict(values)
        if values.get("augment") is not None:
            values["augment"] = AugmentConfig(**values["augment"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**values)

    def resolved(self) -> Config:
        """The same configuration with the architecture's defaults filled in."""
        from pneumoscan.model import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}"
            )
        recipe = ARCHITECTURES[self.arch].recipe
        missing = {name: value for name, value in recipe.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **missing)

    def differences(self, other: Config) -> list[str]:
        """Human-readable `key: old -> new` lines, empty when equal."""
        mine, theirs = _flatten(self.to_dict()), _flatten(other.to_dict())
        return [
            f"{key}: {mine.get(key)!r} -> {theirs.get(key)!r}"
            for key in sorted(set(mine) | set(theirs))
            if mine.get(key) != theirs.get(key)
        ]

    def save(self, path: Path) -> None:
        from pneumoscan.io import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
