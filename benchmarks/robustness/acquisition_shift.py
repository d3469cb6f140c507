"""The frozen acquisition-shift benchmark, built by
`python -m benchmarks.robustness.make_acquisition_shift --data ROOT --split val --out DIR`.

Validation flatters: Kermany et al.'s CNN scored val AUC 0.994 but 0.942 on the official test
split, acquired in another period. This module rebuilds the val split (model selection) and the
internal-test split (reporting only) exactly as training carves them, then passes every image
through one or two fixed acquisition-like changes (`FAMILIES`). Each image's parameters come
from (seed, the file's sha256) alone, so they do not depend on file order, and the written bytes
are hashed into a digest that `acquisition_shift_manifest.json` (beside this file) freezes before
any model search.

Families marked `held_out` never appear in training augmentation (`AugmentConfig`: rotation,
zoom, translation, brightness, contrast); the others are stronger versions of what training sees.
Severities are moderate (a reader can still read the film) and are defined for a 224-pixel
image: sizes in pixels scale with the image's shorter side. The image operations are
`pneumoscan.perturb`'s (PIL and NumPy only, no TF), so the same inputs give the same bytes on
every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pneumoscan import perturb as ops  # the module; `perturb` below is this benchmark's own step
from pneumoscan.atomic import replace_dir_atomic, write_json_atomic
from pneumoscan.config import CLASS_NAMES, AugmentConfig, Config
from pneumoscan.data import Sample, load_splits, split_digest
from pneumoscan.preprocess import load_grayscale

# The Cell paper's publication date (2018-02-22); changing it makes a new benchmark.
SHIFT_SEED = 20180222
SHIFT_SPLITS = ("val", "internal-test")
REFERENCE_SIDE = 224
PNG_COMPRESS_LEVEL = 6
MARKER_TEXTS = {"letter": ("L", "R"), "label": ("PORTABLE", "AP", "SUPINE", "ERECT")}


class _Draws:
    """Named uniform draws from sha256(seed, file hash, name): stable across NumPy versions."""

    def __init__(self, seed: int, file_sha256: str) -> None:
        self.key = f"{seed}:{file_sha256}"

    def unit(self, name: str) -> float:
        digest = hashlib.sha256(f"{self.key}:{name}".encode()).digest()
        return int.from_bytes(digest[:7], "big") / 2**56

    def uniform(self, name: str, low: float, high: float, digits: int = 3) -> float:
        return round(low + self.unit(name) * (high - low), digits)

    def integer(self, name: str, low: int, high: int) -> int:
        """An integer in [low, high], both included."""
        return low + min(int(self.unit(name) * (high - low + 1)), high - low)

    def choice(self, name: str, options: Sequence):
        return options[self.integer(name, 0, len(options) - 1)]

    def around_one(self, name: str, low: float, high: float) -> float:
        """A factor whose log magnitude lies in [log low, log high], below or above 1."""
        magnitude = math.exp(self.uniform(name, math.log(low), math.log(high), 6))
        return round(magnitude if self.unit(f"{name}:sign") < 0.5 else 1 / magnitude, 3)


def _pixels(side: int, reference_pixels: float) -> float:
    return reference_pixels * side / REFERENCE_SIDE


# Each family's step: (H, W) uint8 and its drawn parameters -> the perturbed image.


def _exposure(gray: np.ndarray, p: dict) -> np.ndarray:
    return ops.exposure(gray, p["gain"])


def _contrast(gray: np.ndarray, p: dict) -> np.ndarray:
    return ops.contrast(gray, p["factor"])


def _gamma(gray: np.ndarray, p: dict) -> np.ndarray:
    return ops.gamma(gray, p["gamma"])


def _crop(gray: np.ndarray, p: dict) -> np.ndarray:
    """A window of `scale` x each side at relative position (x, y), resized back: a zoom."""
    height, width = gray.shape
    left, top = p["x"] * width * (1 - p["scale"]), p["y"] * height * (1 - p["scale"])
    return ops.window(gray, (left, top, left + width * p["scale"], top + height * p["scale"]))


def _stretch(gray: np.ndarray, p: dict) -> np.ndarray:
    """Anatomy elongated along one axis by `factor`; the overflow is cropped at `offset`."""
    height, width = gray.shape
    if p["axis"] == "width":
        left = p["offset"] * width * (1 - 1 / p["factor"])
        return ops.window(gray, (left, 0, left + width / p["factor"], height))
    top = p["offset"] * height * (1 - 1 / p["factor"])
    return ops.window(gray, (0, top, width, top + height / p["factor"]))


def _pad(gray: np.ndarray, p: dict) -> np.ndarray:
    """Borders on two opposite sides: the aspect ratio grows by `fraction` (letter-boxing)."""
    axis = 1 if p["axis"] == "width" else 0
    total = round(p["fraction"] * gray.shape[axis])
    before = round(p["before"] * total)
    return ops.pad(gray, axis, before, total - before, p["fill"])


def _blur(gray: np.ndarray, p: dict) -> np.ndarray:
    return ops.blur(gray, _pixels(min(gray.shape), p["sigma"]))


def _noise(gray: np.ndarray, p: dict) -> np.ndarray:
    return ops.noise(gray, p["sigma"], p["seed"])


def _marker(gray: np.ndarray, p: dict) -> np.ndarray:
    """A bright letter, as a lead marker shows (cropped to its ink), or a burnt-in label: a
    bright box with dark text; `size` scales the font, `margin` is a fraction of the side."""
    if p["kind"] == "letter":
        mask = ops.glyph(p["text"])
        values = np.full(mask.shape, p["value"], np.uint8)
    else:
        ink = ops.glyph(p["text"], pad=2, crop=False)
        mask, values = np.ones_like(ink), np.where(ink, 0, p["value"]).astype(np.uint8)
    scale = _pixels(min(gray.shape), p["size"])
    height, width = max(1, round(mask.shape[0] * scale)), max(1, round(mask.shape[1] * scale))
    mask = ops.resize_nearest(mask, height, width)
    values = ops.resize_nearest(values, height, width)
    top, left = ops.corner_origin(gray.shape, mask.shape, p["corner"], round(p["margin"] * min(gray.shape)))
    return ops.stamp(gray, mask, values, top, left)


def _blackout(gray: np.ndarray, p: dict) -> np.ndarray:
    """A black patch in one corner, as when a marker or label is masked out."""
    return ops.blackout(
        gray, p["corner"], round(p["height"] * gray.shape[0]), round(p["width"] * gray.shape[1])
    )


def _resample(gray: np.ndarray, p: dict) -> np.ndarray:
    return ops.resample(gray, p["scale"], p["down"], p["up"])


def _jpeg(gray: np.ndarray, p: dict) -> np.ndarray:
    return gray  # applied by `encode`, which writes the file at this quality


@dataclass(frozen=True)
class Family:
    name: str
    held_out: bool
    training_counterpart: str | None  # the AugmentConfig field that covers it in training
    severity: str
    draw: Callable[[_Draws], dict]
    apply: Callable[[np.ndarray, dict], np.ndarray]

    def describe(self) -> dict:
        return {
            "held_out": self.held_out,
            "training_counterpart": self.training_counterpart,
            "severity": self.severity,
        }


def _draw_marker(d: _Draws) -> dict:
    kind = d.choice("marker.kind", ("letter", "label"))
    size = d.uniform("marker.size", 3.0, 5.0) if kind == "letter" else d.uniform("marker.size", 1.0, 1.6)
    return {
        "kind": kind,
        "text": d.choice("marker.text", MARKER_TEXTS[kind]),
        "corner": d.choice("marker.corner", ops.CORNERS),
        "size": size,
        "value": d.integer("marker.value", 215, 255),
        "margin": d.uniform("marker.margin", 0.02, 0.06),
    }


# Listed in the order they are applied: exposure first, file encoding last.
FAMILIES = (
    Family(
        "exposure",
        False,
        "brightness",
        "gain x0.83-0.91 or x1.1-1.2 (clipped)",
        lambda d: {"gain": d.around_one("exposure.gain", 1.1, 1.2)},
        _exposure,
    ),
    Family(
        "contrast",
        False,
        "contrast",
        "factor x0.75-0.87 or x1.15-1.33 around the mean",
        lambda d: {"factor": d.around_one("contrast.factor", 1.15, 1.33)},
        _contrast,
    ),
    Family(
        "gamma",
        True,
        None,
        "gamma 0.67-0.8 or 1.25-1.5 (0 and 255 stay put)",
        lambda d: {"gamma": d.around_one("gamma.gamma", 1.25, 1.5)},
        _gamma,
    ),
    Family(
        "crop",
        False,
        "zoom",
        "window of 82-92% of each side, anywhere, resized back",
        lambda d: {
            "scale": d.uniform("crop.scale", 0.82, 0.92),
            "x": d.uniform("crop.x", 0, 1),
            "y": d.uniform("crop.y", 0, 1),
        },
        _crop,
    ),
    Family(
        "stretch",
        True,
        None,
        "one axis stretched x1.08-1.2, overflow cropped",
        lambda d: {
            "axis": d.choice("stretch.axis", ("width", "height")),
            "factor": d.uniform("stretch.factor", 1.08, 1.2),
            "offset": d.uniform("stretch.offset", 0, 1),
        },
        _stretch,
    ),
    Family(
        "blur",
        True,
        None,
        "Gaussian sigma 0.8-1.5 px",
        lambda d: {"sigma": d.uniform("blur.sigma", 0.8, 1.5)},
        _blur,
    ),
    Family(
        "noise",
        True,
        None,
        "additive Gaussian, sigma 2-6 grey levels",
        lambda d: {
            "sigma": d.uniform("noise.sigma", 2.0, 6.0),
            "seed": d.integer("noise.seed", 0, 2**31 - 1),
        },
        _noise,
    ),
    Family(
        "marker",
        True,
        None,
        "in a corner: bright L/R letter 18-30 px tall, or white label with dark text 15-24 px tall",
        _draw_marker,
        _marker,
    ),
    Family(
        "blackout",
        True,
        None,
        "black patch of 10-20% x 10-20% of the sides in a corner",
        lambda d: {
            "corner": d.choice("blackout.corner", ops.CORNERS),
            "width": d.uniform("blackout.width", 0.1, 0.2),
            "height": d.uniform("blackout.height", 0.1, 0.2),
        },
        _blackout,
    ),
    Family(
        "pad",
        True,
        None,
        "dark borders on two opposite sides: aspect ratio +10-25%",
        lambda d: {
            "axis": d.choice("pad.axis", ("width", "height")),
            "fraction": d.uniform("pad.fraction", 0.1, 0.25),
            "before": d.uniform("pad.before", 0.2, 0.8),
            "fill": d.integer("pad.fill", 0, 24),
        },
        _pad,
    ),
    Family(
        "resample",
        True,
        None,
        "down to 45-65% (box or nearest) and back up (nearest/bilinear/bicubic)",
        lambda d: {
            "scale": d.uniform("resample.scale", 0.45, 0.65),
            "down": d.choice("resample.down", ("box", "nearest")),
            "up": d.choice("resample.up", ("nearest", "bilinear", "bicubic")),
        },
        _resample,
    ),
    Family(
        "jpeg",
        True,
        None,
        "saved as JPEG at quality 15-35",
        lambda d: {"quality": d.integer("jpeg.quality", 15, 35)},
        _jpeg,
    ),
)
FAMILY_BY_NAME = {family.name: family for family in FAMILIES}
HELD_OUT_FAMILIES = tuple(f.name for f in FAMILIES if f.held_out)
TRAINING_AUGMENTATION = tuple(f.name for f in dataclasses.fields(AugmentConfig))


def plan_one(file_sha256: str, seed: int = SHIFT_SEED) -> dict:
    """One image's parameters: one or two families (half the images each), in `FAMILIES` order."""
    draws = _Draws(seed, file_sha256)
    names = [f.name for f in FAMILIES]
    chosen = [names.pop(draws.integer("first", 0, len(names) - 1))]
    if draws.unit("count") < 0.5:
        chosen.append(names[draws.integer("second", 0, len(names) - 1)])
    steps = [{"family": f.name, **f.draw(draws)} for f in FAMILIES if f.name in chosen]
    return {"steps": steps}


def plan(samples: Sequence[Sample], seed: int = SHIFT_SEED) -> list[dict]:
    """Each sample's parameters, from (seed, its sha256) alone: independent of order."""
    return [plan_one(sample.sha256, seed) for sample in samples]


def transform(gray: np.ndarray, params: dict) -> np.ndarray:
    """(H, W) uint8 -> perturbed (H', W') uint8, before encoding; `gray` is not modified.

    Raises:
        ValueError: not a 2-D uint8 array, or an unknown family.
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a (height, width) uint8 image, got {gray.dtype} of shape {gray.shape}")
    out = gray
    for step in params["steps"]:
        if step["family"] not in FAMILY_BY_NAME:
            raise ValueError(f"unknown shift family {step['family']!r}; known: {', '.join(FAMILY_BY_NAME)}")
        out = FAMILY_BY_NAME[step["family"]].apply(out, step)
    return out


def file_format(params: dict) -> str:
    """'jpeg' when the `jpeg` family is among the steps, else lossless 'png'."""
    return "jpeg" if any(step["family"] == "jpeg" for step in params["steps"]) else "png"


def perturb(gray: np.ndarray, params: dict) -> bytes:
    """(H, W) uint8 -> the perturbed image file's bytes (JPEG or PNG, see `file_format`)."""
    image = Image.fromarray(transform(gray, params))
    buffer = io.BytesIO()
    if file_format(params) == "jpeg":
        quality = next(s["quality"] for s in params["steps"] if s["family"] == "jpeg")
        image.save(buffer, format="JPEG", quality=quality, optimize=False)
    else:
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def output_relpath(relpath: str, params: dict) -> str:
    """The original name with a suffix matching the written format (patient ids stay parseable)."""
    path = Path(relpath)
    if file_format(params) == "png":
        return path.with_suffix(".png").as_posix()
    return (
        path.as_posix() if path.suffix.lower() in (".jpeg", ".jpg") else path.with_suffix(".jpeg").as_posix()
    )


def shifted_digest(files: dict[str, dict]) -> str:
    """sha256 over sorted `relpath sha256` lines: equals `data.split_digest` of the output folder."""
    return hashlib.sha256(
        "\n".join(sorted(f"{name} {entry['sha256']}" for name, entry in files.items())).encode()
    ).hexdigest()


def describe_families() -> dict:
    return {
        "order": [f.name for f in FAMILIES],
        "reference_side": REFERENCE_SIDE,
        "families": {f.name: f.describe() for f in FAMILIES},
        "held_out_families": list(HELD_OUT_FAMILIES),
        "training_augmentation": list(TRAINING_AUGMENTATION),
    }


def _shift_one(sample: Sample, params: dict) -> tuple[str, bytes]:
    return output_relpath(sample.relpath, params), perturb(load_grayscale(sample.path), params)


def build_shifted(root: Path, split: str, out_dir: Path, seed: int = SHIFT_SEED) -> str:
    """Write the shifted copy of one split to `out_dir` (swapped in whole) and return its digest.

    The split is rebuilt with `Config`'s split defaults, as training carves it. `out_dir` gets
    `{NORMAL,PNEUMONIA}/<original name>` and `manifest.json` (seed, families, per-file params
    and sha256, digest).

    Raises:
        ValueError: unknown split, `out_dir` inside `root`, or two outputs with one name.
        DataError: the data folder cannot be used.
    """
    root, out_dir = Path(root), Path(out_dir)
    if split not in SHIFT_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SHIFT_SPLITS)}")
    if out_dir.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{out_dir}: is inside the data folder {root}; write the shifted set elsewhere")
    config = Config()
    splits = load_splits(root, config.val_fraction, config.internal_test_fraction, config.random_seed)
    samples = splits.splits[split]
    params = plan(samples, seed)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        written = list(pool.map(_shift_one, samples, params))
    files = {}
    for sample, step_params, (name, data) in zip(samples, params, written, strict=True):
        if name in files:
            raise ValueError(
                f"{root}: {files[name]['source']} and {sample.relpath} would both be written as {name}"
            )
        files[name] = {
            "source": sample.relpath,
            "source_sha256": sample.sha256,
            "label": CLASS_NAMES[sample.label],
            **step_params,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    digest = shifted_digest(files)
    manifest = {
        "generator": "benchmarks.robustness.acquisition_shift "
        "(python -m benchmarks.robustness.make_acquisition_shift)",
        "seed": seed,
        "split": split,
        "source": {"rule": splits.rule, "split_digest": split_digest(samples)},
        "versions": library_versions(),
        **describe_families(),
        "digest": digest,
        "files": files,
    }
    _write_folder(out_dir, dict(written), manifest)
    return digest


def _write_folder(out_dir: Path, images: dict[str, bytes], manifest: dict) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name in CLASS_NAMES:
            (build / name).mkdir()
        for name, data in images.items():
            (build / name).write_bytes(data)
        write_json_atomic(build / "manifest.json", manifest)
        build.chmod(0o755)  # mkdtemp creates 0700; the benchmark is meant to be shared
        replace_dir_atomic(build, out_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def library_versions() -> dict:
    """The encoders behind the bytes: a digest is only comparable under the same ones."""
    import PIL
    from PIL import features

    return {
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "libjpeg": features.version("jpg"),
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "zlib": features.version("zlib"),
    }


def read_manifest(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "manifest.json").read_text())
