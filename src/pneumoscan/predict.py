"""Run a model over files and folders: `pneumoscan predict [--model MODEL] PATH...`.

Images stream through tf.data in batches (memory stays flat however many there are) and the
bundle's one forward pass (`Bundle.forward`); a file that cannot be used becomes a
`{path, error}` record carrying the sentence of its one decode, and the others are still
predicted. The same decode/resize (pneumoscan.preprocess), calibration and threshold
(metadata.json) serve `evaluate` and the web page. This module owns paths, records and rendering.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from pneumoscan.bundle import INFERENCE_BATCH, Bundle
from pneumoscan.data import find_images

FORMATS = ("table", "json", "csv")


def raw_outputs(
    bundle: Bundle, paths: Sequence[str | Path], batch_size: int = INFERENCE_BATCH
) -> Iterator[tuple[str, str, float]]:
    """(path, error, raw model output) for every path, in order, batch by batch; `error` is ""
    when the file decoded, else its one-sentence reason (and the output is meaningless)."""
    import tensorflow as tf

    from pneumoscan.pipeline import images

    if not paths:
        return
    dataset = images(paths, bundle.image_size).batch(batch_size).prefetch(tf.data.AUTOTUNE)
    for batch_paths, errors, x in dataset:
        outputs = bundle.forward(x, batch_size)
        for path, error, output in zip(batch_paths.numpy(), errors.numpy(), outputs, strict=True):
            yield path.decode(), error.decode(), float(output)


def expand_paths(inputs: Iterable[str | Path]) -> list[Path | dict]:
    """In input order: files as given, image files found in folders (`data.find_images`), and
    a `{path, error}` record for an input that does not exist or holds no image."""
    items: list[Path | dict] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = find_images(path)
            error = f"{path}: folder holds no .jpeg, .jpg or .png images."
            items.extend(found or [{"path": str(path), "error": error}])
        elif path.exists():
            items.append(path)
        else:
            items.append({"path": str(path), "error": f"{path}: no such file or folder."})
    return items


def predict_files(
    model: str | Path | Bundle | None, inputs: Sequence[str | Path], batch_size: int = INFERENCE_BATCH
) -> list[dict]:
    """One record per image, in input order: `{path, label, probability, threshold}` or
    `{path, error}`."""
    bundle = Bundle.load(model)
    items = expand_paths(inputs)
    outputs = raw_outputs(bundle, [item for item in items if isinstance(item, Path)], batch_size)
    records = []
    for item in items:
        if isinstance(item, dict):
            records.append(item)
            continue
        path, error, raw = next(outputs)
        if error:
            records.append({"path": path, "error": error})
            continue
        probability = float(bundle.calibrated(np.float32(raw)))
        records.append(
            {
                "path": path,
                "label": bundle.label(probability),
                "probability": probability,
                "threshold": bundle.threshold,
            }
        )
    return records


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
