"""`metadata.json`, the contract between training, Python inference and the web page.

The schema is written down in docs/metadata.md; `validate` enforces it on every read.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
from pathlib import Path
from typing import Any

from pneumoscan.atomic import write_json_atomic
from pneumoscan.config import CLASS_NAMES, POSITIVE_CLASS, Config
from pneumoscan.preprocess import PREPROCESSING_STEPS

SCHEMA_VERSION = 1
FILE_NAME = "metadata.json"
# A bundle's browser model: tfjs/model.json and the weight files it lists, named this way.
TFJS_SHARD_NAME = re.compile(r"group1-shard[0-9]+of[0-9]+\.bin")
NO_CALIBRATION = {"method": "none", "slope": 1.0, "intercept": 0.0, "fitted_on": None}
DEFAULT_THRESHOLD = {"value": 0.5, "rule": "fixed:0.5", "split": None, "applies_to": "calibrated probability"}

# key -> expected type(s); nested objects list their own required keys.
_REQUIRED: dict[str, Any] = {
    "schema_version": int,
    "pneumoscan_version": str,
    "created": str,
    "arch": str,
    "class_names": list,
    "positive_class": str,
    "input": {
        "height": int,
        "width": int,
        "channels": int,
        "dtype": str,
        "color_mode": str,
        "value_range": list,
    },
    "preprocessing": list,
    "output": {"activation": str, "meaning": str},
    "calibration": {"method": str, "slope": (int, float), "intercept": (int, float)},
    "threshold": {"value": (int, float), "rule": str},
    "config": dict,
    "data": {"rule": dict, "splits": dict},
    "training": dict,
    "versions": dict,
}
# Optional blocks, checked when present (models made before them have neither).
_OPTIONAL: dict[str, Any] = {
    "ood": {
        "feature_layer": str,
        "feature_pooling": str,
        "mahalanobis": {
            "mean": dict,
            "components": dict,
            "variances": list,
            "residual_variance": (int, float),
            "threshold": (int, float),
        },
        "colourfulness": {"threshold": (int, float)},
        "aspect": {"threshold": (int, float)},
    },
    "borderline": {"low": (int, float), "high": (int, float)},
    "test_time": {"shifts": list, "fill": (int, float), "combine": str},
    "adaptation": {
        "parent": {"arch": str, "digest": str},
        "site": str,
        "method": str,
        "films": dict,
        "patients": dict,
        "date": str,
        "rule": str,
        "estimate": {"folds": int, "before": dict, "after": dict},
    },
}
TEST_TIME_COMBINE = "mean of raw outputs"


from pneumoscan.errors import MetadataError  # noqa: E402  (defined in errors.py since it holds them all)


def library_versions() -> dict[str, str]:
    import keras
    import numpy
    import PIL
    import tensorflow

    return {
        "python": platform.python_version(),
        "tensorflow": tensorflow.__version__,
        "keras": keras.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }


def copies_block(size: int, fraction: float) -> dict[str, Any] | None:
    """metadata.json's `test_time` for an S x S input: the film and two copies moved diagonally
    by `fraction` of S (at least a pixel), black fill; None when `fraction` is 0 (no copies)."""
    if fraction <= 0:
        return None
    step = max(1, round(fraction * size))
    return {
        "shifts": [[0, 0], [-step, -step], [step, step]],
        "fill": 0,
        "combine": TEST_TIME_COMBINE,
        "fraction": fraction,
        "meaning": "the model's raw output on a film is the mean of its raw outputs on these copies "
        "of the model input, [dy, dx] = content moved down by dy and right by dx pixels, `fill` "
        "coming in; calibration, threshold, borderline band and ood threshold apply to that mean; "
        "the heatmap and the ood features are the first copy's (the film itself)",
    }


def build(config: Config, data_summary: dict, training: dict) -> dict[str, Any]:
    """metadata for a freshly trained model (no calibration, threshold 0.5).

    Raises:
        ValueError: `config` is not resolved (the run resolves it once; see `Config.resolved`).
    """
    from pneumoscan import __version__

    if not config.is_resolved:
        raise ValueError("metadata.build takes the run's resolved configuration (Config.resolved()).")
    test_time = copies_block(config.image_size, config.test_time_shift)
    return {
        "schema_version": SCHEMA_VERSION,
        "pneumoscan_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "arch": config.arch,
        "class_names": list(CLASS_NAMES),
        "positive_class": POSITIVE_CLASS,
        "input": {
            "height": config.image_size,
            "width": config.image_size,
            "channels": 1,
            "dtype": "float32",
            "color_mode": "grayscale",
            "value_range": [0, 255],
        },
        "preprocessing": [
            dict(step, size=[config.image_size] * 2) if step["op"] == "resize" else step
            for step in PREPROCESSING_STEPS
        ],
        "output": {"activation": "sigmoid", "meaning": f"probability of {POSITIVE_CLASS} before calibration"},
        "calibration": dict(NO_CALIBRATION),
        "threshold": dict(DEFAULT_THRESHOLD),
        "config": config.to_dict(),
        "data": data_summary,
        "training": training,
        "versions": library_versions(),
        **({"test_time": test_time} if test_time else {}),
    }


def validate(metadata: Any, source: str = FILE_NAME) -> dict[str, Any]:
    """Return `metadata` unchanged, or raise MetadataError naming the first wrong key."""
    if not isinstance(metadata, dict):
        raise MetadataError(f"{source}: expected a JSON object.")
    _check(metadata, _REQUIRED, source, "")
    _check(metadata, {key: spec for key, spec in _OPTIONAL.items() if key in metadata}, source, "")
    if metadata["schema_version"] != SCHEMA_VERSION:
        raise MetadataError(
            f"{source}: schema_version {metadata['schema_version']} is not supported "
            f"(this pneumoscan reads {SCHEMA_VERSION})."
        )
    names = metadata["class_names"]
    if len(names) != 2 or metadata["positive_class"] != names[1]:
        raise MetadataError(f"{source}: class_names must be two names with positive_class second.")
    if not 0.0 <= metadata["threshold"]["value"] <= 1.0:
        raise MetadataError(f"{source}: threshold.value must be in [0, 1].")
    if metadata["input"]["channels"] != 1:
        raise MetadataError(f"{source}: input.channels must be 1 (grayscale).")
    if "test_time" in metadata:
        _check_test_time(metadata["test_time"], metadata["input"]["height"], source)
    return metadata


def _check_test_time(block: dict, size: int, source: str) -> None:
    shifts = block["shifts"]
    pairs = all(
        isinstance(shift, list) and len(shift) == 2 and all(type(v) is int and abs(v) < size for v in shift)
        for shift in shifts
    )
    if not pairs or not shifts or shifts[0] != [0, 0]:
        raise MetadataError(
            f"{source}: test_time.shifts must be [dy, dx] pixel pairs smaller than the input, "
            "the first [0, 0] (the film itself)."
        )
    if block["combine"] != TEST_TIME_COMBINE:
        raise MetadataError(f"{source}: test_time.combine must be {TEST_TIME_COMBINE!r}.")


def _check(values: dict, spec: dict, source: str, prefix: str) -> None:
    for key, expected in spec.items():
        name = f"{prefix}{key}"
        if key not in values:
            raise MetadataError(f"{source}: key {name!r} is missing.")
        if isinstance(expected, dict):
            if not isinstance(values[key], dict):
                raise MetadataError(f"{source}: {name!r} must be an object.")
            _check(values[key], expected, source, f"{name}.")
        elif not isinstance(values[key], expected) or isinstance(values[key], bool):
            raise MetadataError(f"{source}: {name!r} has the wrong type ({type(values[key]).__name__}).")


def read(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / FILE_NAME
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError:
        raise MetadataError(f"{path}: not found; is {model_dir} a run folder or a model bundle?") from None
    except (OSError, json.JSONDecodeError) as error:
        raise MetadataError(f"{path}: cannot be read ({error}).") from None
    return validate(metadata, str(path))


def write(model_dir: Path, metadata: dict[str, Any]) -> None:
    validate(metadata)
    write_json_atomic(Path(model_dir) / FILE_NAME, metadata)


def digest(model_dir: Path) -> str:
    """The SHA-256 (hex) of the model's metadata.json bytes: names one model for an audit trail
    (its export time, calibration and threshold are in it); the web page computes the same
    digest of the file it fetched."""
    import hashlib

    return hashlib.sha256((Path(model_dir) / FILE_NAME).read_bytes()).hexdigest()
