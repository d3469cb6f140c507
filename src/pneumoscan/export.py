"""Write a model bundle: `pneumoscan export --model RUN_DIR --out BUNDLE_DIR [--quantize Q]`.

BUNDLE_DIR/
    model.keras      Keras 3 model (inference only)
    saved_model/     TensorFlow SavedModel (serving signature `serve`)
    model.h5         HDF5 (legacy Keras format)
    tfjs/            model.json + group1-shard*of*.bin for tf.loadLayersModel (TF.js 4.22)
    model.tflite     LiteRT flatbuffer with the outputs inference reads (`pneumoscan.litert`):
                     `predict`, `evaluate`, `explain --method cam`, ... run it without TensorFlow
    metadata.json    the run's metadata plus an `export` block
    splits.json      the run's file lists, when it has them (lets `evaluate` flag training files)

With `--quantize float16|uint8`, every format carries the quantized weights (dequantized to
float32 for Keras, SavedModel, HDF5 and LiteRT), so `pneumoscan predict` and the web page run the
same numbers. The folder is written under a temporary name and swapped in whole, so a reader
never sees a half-written bundle.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from pneumoscan import litert, run_folder
from pneumoscan import metadata as metadata_io
from pneumoscan.atomic import replace_dir_atomic
from pneumoscan.bundle import Bundle, set_named_weights
from pneumoscan.model import heatmap_spec

FORMATS = ("keras", "saved_model", "h5", "tfjs", "tflite")


from pneumoscan.errors import ExportError  # noqa: E402  (defined in errors.py since it holds them all)


def export_bundle(
    run_dir: Path,
    out_dir: Path,
    quantize: str = "none",
    formats: tuple[str, ...] = FORMATS,
    source: str | None = None,
) -> dict:
    """Export the model of `run_dir` to `out_dir`; returns the `export` block of its metadata,
    whose `source` is `run_dir` unless `source` names where the model came from.

    Raises:
        ExportError: `out_dir` exists, is not a bundle and is not empty.
        ValueError: a layer TF.js cannot run, or an unknown `quantize` (from pneumoscan.tfjs).
    """
    from pneumoscan.tfjs import read_weights, write_tfjs

    out_dir = Path(out_dir)
    _refuse_foreign(out_dir)
    bundle = Bundle.load(run_dir, runtime="keras")
    build = out_dir.with_name(f".{out_dir.name}.export")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        tfjs = write_tfjs(bundle.model, build / "tfjs", quantize=quantize)
        if quantize != "none":  # the browser's weights, for every other format too
            set_named_weights(bundle.model, read_weights(build / "tfjs"))
        if "tfjs" not in formats:
            shutil.rmtree(build / "tfjs")
            tfjs = None
        if "keras" in formats:
            bundle.model.save(build / run_folder.MODEL)
        if "saved_model" in formats:
            bundle.model.export(str(build / "saved_model"), format="tf_saved_model", verbose=False)
        if "h5" in formats:
            bundle.model.save(build / "model.h5")
        if (bundle.folder / run_folder.SPLITS).is_file():
            shutil.copy2(bundle.folder / run_folder.SPLITS, build / run_folder.SPLITS)
        meta = {"heatmap": heatmap_spec(bundle.model), **bundle.metadata}  # runs trained before it had one
        meta["export"] = {
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "source": source or str(bundle.folder),
            "quantize": quantize,
            "weights": "float32" if quantize == "none" else f"{quantize}-rounded in every format",
            "formats": [f for f in FORMATS if f in formats],
            "tfjs_bytes": tfjs["total_bytes"] if tfjs else None,
        }
        if "tflite" in formats:
            meta["export"]["litert"] = litert.write(bundle.model, build / litert.FILE_NAME, meta)
        metadata_io.write(build, meta)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    replace_dir_atomic(build, out_dir)
    return meta["export"]


def add_litert(bundle_dir: Path, out_dir: Path) -> dict:
    """`bundle_dir`'s files as they are, plus `model.tflite` converted from its model.keras and
    the `export.litert` block that names it, written to `out_dir` (which may be `bundle_dir`
    itself) and swapped in whole: `pneumoscan export --add-litert`, for a bundle exported before
    the flatbuffer. Its weights are taken as the bundle stores them (already rounded as shipped),
    and no other file changes. Returns the `litert` block.

    Raises:
        ExportError: `bundle_dir` is not an exported bundle, or `out_dir` is another folder
            that exists and holds no bundle.
    """
    import tempfile

    bundle_dir, out_dir = Path(bundle_dir), Path(out_dir)
    bundle = Bundle.load(bundle_dir, runtime="keras")
    if "export" not in bundle.metadata:
        raise ExportError(
            f"{bundle_dir}: is a run folder, not an exported bundle; export it without --add-litert."
        )
    _refuse_foreign(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shutil.copytree(
            bundle_dir, build, dirs_exist_ok=True, ignore=shutil.ignore_patterns(litert.FILE_NAME)
        )
        meta = {"heatmap": heatmap_spec(bundle.model), **bundle.metadata}
        meta["export"] = {
            **meta["export"],
            "litert": litert.write(bundle.model, build / litert.FILE_NAME, meta),
        }
        metadata_io.write(build, meta)
        replace_dir_atomic(build, out_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return meta["export"]["litert"]


def _refuse_foreign(out_dir: Path) -> None:
    """ExportError unless `out_dir` is absent, empty or a bundle (which the export replaces)."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / metadata_io.FILE_NAME).exists():
        raise ExportError(f"{out_dir}: folder is not empty and holds no model bundle; choose another --out.")


def round_as_shipped(model, quantize: str) -> None:
    """Set `model`'s weights to those a bundle exported with `quantize` carries in every format
    (what TF.js loads); nothing for `none`. A decision fitted after it holds for the bundle."""
    if quantize == "none":
        return
    import tempfile

    from pneumoscan.tfjs import read_weights, write_tfjs

    with tempfile.TemporaryDirectory() as tmp:
        write_tfjs(model, Path(tmp) / "tfjs", quantize=quantize)
        set_named_weights(model, read_weights(Path(tmp) / "tfjs"))
