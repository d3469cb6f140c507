"""The one configuration object: `pneumoscan train` builds it, every stage reads it.

`Config` holds every hyper-parameter of a run. A field left at None takes the value of the
architecture's `Recipe` (`RECIPES`) in `Config.resolved()`; the resolved configuration is what a
run records in `RUN_DIR/config.json`, and the same command on the same folder compares against
it to resume, or to refuse a changed configuration. The CLI takes its defaults from here, and
the threshold rule is parsed here, once (`ThresholdRule.parse`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumoscan.atomic import write_json_atomic

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
POSITIVE_CLASS = "PNEUMONIA"
SCHEDULES = ("plateau", "cosine")
STRATEGIES = ("default", "mirrored", "multi-worker")  # pneumoscan.strategy
PRECISIONS = ("float32", "mixed_float16")
VAL_DESIGNS = ("acquisition", "random")  # pneumoscan.data
# Names a configuration once used, and what they are called now: old run folders still resume.
RENAMED_KEYS = {"seed": "random_seed"}
RENAMED_AUGMENT_KEYS = {"shift": "translation"}


@dataclass(frozen=True)
class ThresholdRule:
    """How the operating threshold is chosen on the validation split.

    `youden` (maximise sensitivity + specificity - 1), `sensitivity:X` (the largest threshold whose
    sensitivity is at least X, 0 < X <= 1) or `fixed:X` (X itself, 0 <= X <= 1). `text` is the rule
    as written, which metadata.json records.
    """

    kind: str
    value: float | None
    text: str

    FORMS = "'youden', 'sensitivity:X' with 0 < X <= 1, or 'fixed:X' with 0 <= X <= 1"

    @classmethod
    def parse(cls, rule: str | ThresholdRule) -> ThresholdRule:
        """Raises:
        ValueError: the rule is none of the three forms.
        """
        if isinstance(rule, ThresholdRule):
            return rule
        problem = ValueError(f"threshold rule {rule!r} is not understood; use {cls.FORMS}")
        if not isinstance(rule, str):
            raise problem
        if rule == "youden":
            return cls("youden", None, rule)
        kind, _, number = rule.partition(":")
        if kind not in ("sensitivity", "fixed"):
            raise problem
        try:
            value = float(number)
        except ValueError:
            raise problem from None
        lowest_ok = value > 0.0 if kind == "sensitivity" else value >= 0.0
        if not (lowest_ok and value <= 1.0):  # also rejects NaN
            raise problem
        return cls(kind, value, rule)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only augmentation (`pneumoscan.augment`); factors follow Keras' preprocessing
    layers. The acquisition fields are off at 0.

    Attributes:
        zoom: magnification drawn uniformly in [1 - zoom, 1 + zoom] (zooms out and in).
        zoom_in: when above 1, replaces `zoom`: magnification drawn log-uniformly in
            [1, zoom_in), a random crop in (of down to 1 / zoom_in**2 of the area, wherever
            the translation puts it), never a zoom out; 0 is off.
        translation: the largest move in each direction, a fraction of the side.
        gamma: tone curves 255 (x/255)^g with log g uniform in ±log(1 + gamma).
        detail: blur toward a Gaussian of the image (up to `detail` of the way) or sharpen by
            unsharp masking (as much away from it).
        noise: additive Gaussian noise of up to `noise` grey levels.
        text_stamps: the share of films, of either class, that get bright burned-in text.
        erase: the share of films that get a random rectangle filled with their mean.
    """

    rotation_degrees: float = 7.0
    zoom: float = 0.1
    zoom_in: float = 0.0
    translation: float = 0.08
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: float = 0.0
    detail: float = 0.0
    noise: float = 0.0
    text_stamps: float = 0.0
    erase: float = 0.0

    def __post_init__(self) -> None:
        if not (self.zoom_in == 0.0 or self.zoom_in >= 1.0):  # also rejects NaN
            raise ValueError(f"zoom-in must be 0 (off) or at least 1, got {self.zoom_in}")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture's own hyper-parameters (`model.py` says what each means for each).

    Attributes:
        widths: filters of each stage (pneumonet) or of each convolution block (seed).
        stem_filters: filters of pneumonet's 4x4 stride-4 stem; None where there is no stem.
        dense_units: width of the hidden dense layer (seed); None where there is none.
        dropout_rate: dropout before the output layer.
        batchnorm_momentum: momentum of every batch norm; None where there is no batch norm.
        standardise_input: pneumonet: each image scaled to mean 0 and standard deviation 1
            (over its pixels) before the stem, so that its exposure and contrast cannot
            inform the output.
    """

    widths: tuple[int, ...]
    stem_filters: int | None = None
    dense_units: int | None = None
    dropout_rate: float = 0.0
    batchnorm_momentum: float | None = None
    standardise_input: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))  # JSON gives a list back
        if not self.widths or any(width < 1 for width in self.widths):
            raise ValueError(f"model widths must be positive filter counts, got {self.widths}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {self.dropout_rate}")


@dataclass(frozen=True)
class Recipe:
    """What an architecture trains with unless told otherwise: a value for each recipe field
    of `Config`."""

    description: str
    image_size: int
    epochs: int
    batch_size: int
    learning_rate: float
    schedule: str
    warmup_epochs: int
    weight_decay: float
    label_smoothing: float
    early_stopping_patience: int
    augment: AugmentConfig
    model: ModelConfig


RECIPES: dict[str, Recipe] = {
    # Augmentation chosen on the dev films of the real shift (BENCHMARKS.md, "The recipe: crops in
    # and stronger intensity jitter"): crops in to a quarter of the area (zoom_in 2), wider moves
    # and stronger intensity jitter. Batch size, schedule and 160 px: BENCHMARKS.md, "Recipe
    # search" (benchmarks/robustness/recipe_search.py, on val and shifted val).
    # Batch-norm momentum 0.9 (not Keras' 0.99): the moving statistics follow the weights within
    # ~10 steps, so validation in early, fast-moving epochs is not judged on stale statistics.
    "pneumonet": Recipe(
        description="compact residual CNN, grayscale, batch norm, GAP",
        image_size=160,
        # 60 epochs, no early stopping: confirmed on the dev films over three seeds against 30
        # epochs with early stopping (BENCHMARKS.md, "Training longer"); the shipped model's.
        epochs=60,
        batch_size=32,
        learning_rate=1e-3,
        schedule="cosine",
        warmup_epochs=2,
        weight_decay=1e-4,
        label_smoothing=0.05,
        early_stopping_patience=60,
        augment=AugmentConfig(
            rotation_degrees=10.0,
            zoom=0.0,
            zoom_in=2.0,
            translation=0.15,
            brightness=0.3,
            contrast=0.4,
            gamma=0.5,
            noise=4.0,
        ),
        model=ModelConfig(widths=(48, 96, 160), stem_filters=32, dropout_rate=0.2, batchnorm_momentum=0.9),
    ),
    "seed": Recipe(
        description="the paper's CNN (Kermany et al., 2018)",
        image_size=150,
        epochs=12,
        batch_size=32,
        learning_rate=1e-3,
        schedule="plateau",
        warmup_epochs=0,
        weight_decay=0.0,
        label_smoothing=0.0,
        early_stopping_patience=4,
        augment=AugmentConfig(),
        model=ModelConfig(widths=(32, 64, 128, 128), dense_units=512, dropout_rate=0.5),
    ),
}
RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(Recipe) if f.name != "description")
# Names for `--arch` that say what the architecture is. A run records the recipe's own name
# ("seed" stays in config.json and metadata.json), so folders made before the alias still load.
ARCH_ALIASES: dict[str, str] = {"kermany2018": "seed"}


@dataclass(frozen=True)
class Config:
    """Every hyper-parameter of a run.

    A recipe field (`RECIPE_FIELDS`) left at None takes the architecture's value in `resolved()`.
    `random_seed` seeds the split of the data, the weights, the data order and the augmentation.
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
    random_seed: int = 1337
    val_fraction: float = 0.1
    internal_test_fraction: float = 0.1
    class_weights: bool = True
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    min_learning_rate: float = 1e-6
    # A screening test's operating point, chosen on the dev films of the real shift: the largest
    # threshold that keeps 90% of the val pneumonias: the val pneumonias are harder than the
    # shifted ones, and the normals are what shifts (BENCHMARKS.md, "The operating point on the
    # dev films").
    threshold_rule: ThresholdRule | str = "sensitivity:0.9"
    # How val and internal-test are carved from train (pneumoscan.data): "acquisition" holds out
    # the normals whose acquisition looks like the pneumonia films', "random" draws patients.
    # "random" since the dev films: the acquisition design ranked the worst of four models first,
    # and withheld from training the normals most like the shifted ones.
    val_design: str = "random"
    # Weights training films by (1 / P(label | acquisition)) ** this, so that acquisition stops
    # predicting the label (acquisition.balancing_weights); 0 leaves every film at weight 1. It
    # raised the acquisition design's internal-test figures but not the dev films' (BENCHMARKS.md,
    # "Kept, changed or retired"); off by default.
    acquisition_reweight: float = 0.0
    # Mixup (Zhang et al., 2018): each training film blended with another of its batch, weight
    # lambda ~ Beta(mixup, mixup) folded to >= 0.5, and the loss blended alike; 0 is off.
    mixup: float = 0.0
    # Exponential moving average of the weights, this momentum per step (Keras' `use_ema`):
    # validation, the best epoch and the saved model use the average; 0 is off.
    weight_average_momentum: float = 0.0
    # Training films left out of training (paths relative to the training folder, e.g.
    # "NORMAL/IM-0115-0001.jpeg"): suspect labels (benchmarks/robustness/label_noise.py). They stay
    # eligible for val and internal-test, where every label is kept.
    exclude_files: tuple[str, ...] = ()
    # Test-time shifts: the model's output on a film is the mean of its raw outputs on the film
    # and on two copies moved diagonally by this fraction of the side (black fill), in predict,
    # evaluate, the page and training's calibration alike (metadata.json's `test_time`); 0 is
    # off. What they gain and cost: BENCHMARKS.md, "Test-time copies, built in" and "Kept,
    # changed or retired".
    test_time_shift: float = 0.04
    augment: AugmentConfig | None = None
    model: ModelConfig | None = None
    # Where it trains (pneumoscan.strategy): batch_size is per replica, the global batch and the
    # learning rate scale with the number of replicas.
    strategy: str = "default"
    precision: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch", ARCH_ALIASES.get(self.arch, self.arch))
        if isinstance(self.exclude_files, str):
            raise ValueError("exclude_files must be a list of paths, not one string")
        object.__setattr__(self, "exclude_files", tuple(sorted(set(self.exclude_files))))

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
            (
                0.0 <= self.acquisition_reweight <= 2.0,
                f"acquisition reweight must be in [0, 2], got {self.acquisition_reweight}",
            ),
            (
                0.0 <= self.test_time_shift <= 0.25,
                f"test-time shift must be in [0, 0.25], got {self.test_time_shift}",
            ),
            (0.0 <= self.mixup <= 10.0, f"mixup must be in [0, 10], got {self.mixup}"),
            (
                0.0 <= self.weight_average_momentum < 1.0,
                f"weight-average momentum must be in [0, 1), got {self.weight_average_momentum}",
            ),
            (
                self.val_design in VAL_DESIGNS,
                f"validation design must be one of {', '.join(VAL_DESIGNS)}, got {self.val_design!r}",
            ),
            (
                self.strategy in STRATEGIES,
                f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}",
            ),
            (
                self.precision in PRECISIONS,
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        # Parsed here, once: a bad rule is refused before training, not after.
        object.__setattr__(self, "threshold_rule", ThresholdRule.parse(self.threshold_rule))

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["threshold_rule"] = str(self.threshold_rule)
        values["exclude_files"] = list(self.exclude_files)
        if self.model is not None:
            values["model"]["widths"] = list(self.model.widths)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        values = {RENAMED_KEYS.get(key, key): value for key, value in values.items()}
        values.setdefault("val_design", "random")  # saved before the design existed: it split at random
        values.setdefault("acquisition_reweight", 0.0)  # nor were films weighted
        values.setdefault("test_time_shift", 0.0)  # nor outputs averaged over shifted copies
        if values.get("augment") is not None:
            augment = {RENAMED_AUGMENT_KEYS.get(k, k): v for k, v in values["augment"].items()}
            values["augment"] = AugmentConfig(**augment)
        if values.get("model") is not None:
            values["model"] = ModelConfig(**values["model"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**values)

    @property
    def is_resolved(self) -> bool:
        """Whether every recipe field holds a value (`resolved()` made it, or it was given whole)."""
        return self.arch in RECIPES and all(getattr(self, name) is not None for name in RECIPE_FIELDS)

    def resolved(self) -> Config:
        """The same configuration with the architecture's recipe filled in; itself when it is
        already resolved, so the stages that receive it never compute it again.

        Raises:
            ValueError: the architecture has no recipe.
        """
        if self.is_resolved:
            return self
        if self.arch not in RECIPES:
            raise ValueError(
                f"unknown architecture {self.arch!r}; choose one of {', '.join(sorted(RECIPES))}"
            )
        recipe = RECIPES[self.arch]
        missing = {name: getattr(recipe, name) for name in RECIPE_FIELDS if getattr(self, name) is None}
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
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))


DEFAULTS = Config()


def read_file_list(path: Path) -> tuple[str, ...]:
    """The paths a list of files to exclude names (`Config.exclude_files`): a text file, one path
    a line, or the JSON of benchmarks/robustness/label_noise.py (its `suspects`' `file`s).

    Raises:
        ValueError: the list cannot be read, or is not such a list (one sentence naming it).
    """
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix.lower() == ".json":
            return tuple(entry["file"] for entry in json.loads(text)["suspects"])
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read the list of files to exclude ({error}).") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"{path}: not a list of files to exclude (a JSON list needs 'suspects' entries with a 'file')."
        ) from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
