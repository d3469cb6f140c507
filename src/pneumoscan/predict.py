"""Run a model over files and folders: `pneumoscan predict [--model MODEL] PATH...`.

Images stream through tf.data in batches (memory stays flat however many there are); a bad
file becomes a `{path, error}` record and the others are still predicted. The same
decode/resize (pneumoscan.preprocess), calibration and threshold (metadata.json) serve
`evaluate` and the web page.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan import metadata as metadata_io
from pneumoscan.preprocess import IMAGE_SUFFIXES, ImageError, load_grayscale

FORMATS = ("table", "json", "csv")


class ModelNotFound(ValueError):
    """No --model given and no bundled model, or the folder is not a model (exit 2)."""


def bundled_model_dir() -> Path | None:
    """The model committed as package data, when there is one."""
    folder = Path(str(resources.files("pneumoscan") / "bundled"))
    return folder if (folder / metadata_io.FILE_NAME).is_file() else None


def resolve_model_dir(model: str | Path | None) -> Path:
    """`--model` as given, or the bundled model."""
    if model is None:
        bundled = bundled_model_dir()
        if bundled is None:
            raise ModelNotFound(
                "no --model given and this installation has no bundled model; "
                "pass --model RUN_DIR (a folder made by pneumoscan train)."
            )
        return bundled
    folder = Path(model)
    if not (folder / "model.keras").is_file() or not (folder / metadata_io.FILE_NAME).is_file():
        raise ModelNotFound(f"{folder}: not a model folder (needs model.keras and metadata.json).")
    return folder


@dataclass
class LoadedModel:
    folder: Path
    model: Any  # keras.Model
    metadata: dict

    @property
    def image_size(self) -> int:
        return int(self.metadata["input"]["height"])

    def calibrated(self, raw: np.ndarray) -> np.ndarray:
        from pneumoscan.calibrate import apply_calibration

        return apply_calibration(raw, self.metadata["calibration"])

    def label(self, probability: float) -> str:
        names = self.metadata["class_names"]
        return names[1] if probability >= self.metadata["threshold"]["value"] else names[0]


def load_model(model: str | Path | None) -> LoadedModel:
    folder = resolve_model_dir(model)
    meta = metadata_io.read(folder)
    import keras

    return LoadedModel(folder, keras.models.load_model(folder / "model.keras", compile=False), meta)


def raw_outputs(
    loaded: LoadedModel, paths: Sequence[str | Path], batch_size: int = 32
) -> Iterator[tuple[str, bool, float]]:
    """(path, decoded_ok, raw model output) for every path, in order, batch by batch."""
    import tensorflow as tf

    from pneumoscan.pipeline import images

    if not paths:
        return
    forward = tf.function(lambda x: loaded.model(x, training=False), reduce_retracing=True)
    dataset = images(paths, loaded.image_size).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    for batch_paths, ok, x in dataset:
        outputs = forward(x).numpy().reshape(-1)
        for path, good, output in zip(batch_paths.numpy(), ok.numpy(), outputs, strict=True):
            yield path.decode(), bool(good), float(output)


def expand_paths(inputs: Iterable[str | Path]) -> list[Path | dict]:
    """In input order: files as given, image files found (recursively, sorted) in folders,
    and a `{path, error}` record for an input that does not exist or holds no image."""
    items: list[Path | dict] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            items.extend(
                found
                or [{"path": str(path), "error": f"{path}: folder holds no .jpeg, .jpg or .png images."}]
            )
        elif path.exists():
            items.append(path)
        else:
            items.append({"path": str(path), "error": f"{path}: no such file or folder."})
    return items


def predict_files(
    model: str | Path | LoadedModel | None, inputs: Sequence[str | Path], batch_size: int = 32
) -> list[dict]:
    """One record per image, in input order: `{path, label, probability, threshold}` or
    `{path, error}`."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    items = expand_paths(inputs)
    threshold = loaded.metadata["threshold"]["value"]
    outputs = raw_outputs(loaded, [item for item in items if isinstance(item, Path)], batch_size)
    records = []
    for item in items:
        if isinstance(item, dict):
            records.append(item)
            continue
        path, ok, raw = next(outputs)
        if not ok:
            records.append({"path": path, "error": _why(path)})
            continue
        probability = float(loaded.calibrated(np.float32(raw)))
        records.append(
            {
                "path": path,
                "label": loaded.label(probability),
                "probability": probability,
                "threshold": threshold,
            }
        )
    return records


def _why(path: str) -> str:
    """The one-sentence reason a file failed (decoded again only for failures)."""
    try:
        load_grayscale(path)
    except ImageError as error:
        return str(error)
    return f"{path}: could not be decoded."


def render(records: list[dict], fmt: str) -> str:
    """Records as `table` (for people), `json` (one array) or `csv` (header + rows)."""
    if fmt == "json":
        return json.dumps(records, indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=["path", "label", "probability", "threshold", "error"], lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue().rstrip("\n")
    return table(
        records,
        f"{'label':<10} {'p(pneumonia)':>12}  threshold",
        lambda r: f"{r['label']:<10} {r['probability']:>12.4f}  {r['threshold']:.4f}",
    )


def table(records: list[dict], header: str, cells: Callable[[dict], str]) -> str:
    """Records as aligned text: the path column, then `cells(record)` or the record's error."""
    width = max([len(r["path"]) for r in records] + [4])
    lines = [f"{'path':<{width}}  {header}"]
    lines += [
        f"{r['path']:<{width}}  " + (f"ERROR  {r['error']}" if "error" in r else cells(r)) for r in records
    ]
    return "\n".join(lines)


def summary_line(records: list[dict]) -> str:
    failed = sum("error" in r for r in records)
    counts: dict[str, int] = {}
    for r in records:
        if "label" in r:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
    parts = ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
    return f"{len(records) - failed} image(s) predicted ({parts or 'none'}); {failed} failed."
