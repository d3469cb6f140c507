"""The one configuration object: `pneumoscan train` builds it, every stage reads it.

A run writes the resolved configuration to `RUN_DIR/config.json`; the same command on the
same folder compares against it to resume, or to refuse a changed configuration.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
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

    `image_size` of None means the architecture's own default (150 for `seed`).
    """

    arch: str = "seed"
    image_size: int | None = None
    epochs: int = 12
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 1337
    val_fraction: float = 0.1
    internal_test_fraction: float = 0.1
    class_weights: bool = True
    early_stopping_patience: int = 4
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    min_learning_rate: float = 1e-6
    threshold_rule: str = "youden"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.learning_rate > 0, f"learning rate must be positive, got {self.learning_rate}"),
            (0 < self.val_fraction < 0.5, f"val fraction must be in (0, 0.5), got {self.val_fraction}"),
            (0 < self.internal_test_fraction < 0.5,
             f"internal-test fraction must be in (0, 0.5), got {self.internal_test_fraction}"),
            (self.image_size is None or 32 <= self.image_size <= 1024,
             f"image size must be between 32 and 1024, got {self.image_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        values = dict(values)
        values["augment"] = AugmentConfig(**values.get("augment", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**values)

    def resolved(self) -> "Config":
        """The same configuration with the architecture's defaults filled in."""
        from pneumoscan.model import ARCHITECTURES

        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}"
            )
        if self.image_size is None:
            return dataclasses.replace(self, image_size=ARCHITECTURES[self.arch].default_image_size)
        return self

    def differences(self, other: "Config") -> list[str]:
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
    def load(cls, path: Path) -> "Config":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
