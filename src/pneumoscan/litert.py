"""The bundle's LiteRT flatbuffer (`model.tflite`): written by `export`, run by `Bundle.forward`
without TensorFlow.

`write` converts a Keras model (TensorFlow's own converter, float32 weights as the bundle rounds
them) into one signature whose input is (n, S, S, 1) float32 in [0, 255], any n, and whose
outputs are named: `raw`, the model's output (n, 1); one output per inner layer that
inference reads, under the layer's name (the out-of-distribution score's `ood.feature_layer`,
the heatmap's `heatmap.feature_layer`); and `cam`, the class activation map's cells (n, h, w, 1)
= that layer's output times `heatmap.weights_layer`'s kernel, when the heatmap's method is
`cam`. metadata.json's `export.litert` block names the file, its outputs and its SHA-256.

`Runtime` is the flatbuffer loaded in `ai_edge_litert`'s interpreter (on every core), after its
digest is checked: the same forward pass as `forward.Forward` (the test-time copies made in
NumPy, each film's raw output their mean, the layer's output the film's own), which
`Bundle.forward` and `Bundle.forward_features` run when the bundle has the file and LiteRT
imports. A layer the flatbuffer lacks is for Keras to run (`has`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.errors import MetadataError
from pneumoscan.forward import copies, in_batches, quiet_stderr
from pneumoscan.perturb import translate

FILE_NAME = "model.tflite"
RAW = "raw"
CAM = "cam"


def available() -> bool:
    """Whether the LiteRT interpreter imports here (a wheel exists for this platform)."""
    try:
        from ai_edge_litert import interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def inner_layers(metadata: dict) -> list[str]:
    """The inner layers whose output inference reads, in a fixed order: the out-of-distribution
    features' layer, then the heatmap's, once each."""
    names = [metadata.get("ood", {}).get("feature_layer"), metadata.get("heatmap", {}).get("feature_layer")]
    return list(dict.fromkeys(name for name in names if name))


def write(model: Any, path: Path, metadata: dict) -> dict:
    """Convert `model` (its weights as they are now) to `path`; returns the `export.litert`
    block: `file`, `signature`, `input`, `outputs` (name -> what it is), `weights`, `bytes`,
    `sha256`."""
    import io

    import keras
    import tensorflow as tf

    layers = inner_layers(metadata)
    heatmap = metadata.get("heatmap") or {}
    # Outputs as the layers give them, no reshape: a shape computed at run time would split the
    # graph in parts that the XNNPACK delegate runs apart (about 8% slower, measured).
    outputs = {RAW: model.output}
    outputs.update((name, model.get_layer(name).output) for name in layers)
    described = {RAW: "the model's output (n, 1), before the test-time copies are averaged"}
    described.update((name, f"layer {name}'s output") for name in layers)
    if heatmap.get("method") == "cam":
        kernel = model.get_layer(heatmap["weights_layer"]).get_weights()[0][:, 0]
        cells = keras.layers.Conv2D(1, 1, use_bias=False, name=f"{CAM}_cells")
        outputs[CAM] = cells(outputs[heatmap["feature_layer"]])
        cells.set_weights([kernel.reshape(1, 1, -1, 1)])
        described[CAM] = (
            f"class activation map cells (n, h, w, 1): {heatmap['feature_layer']}'s output times "
            f"{heatmap['weights_layer']}'s kernel (a 1 x 1 convolution)"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its SavedModel's endpoints
        data = tf.lite.TFLiteConverter.from_keras_model(keras.Model(model.inputs, outputs)).convert()
    path.write_bytes(data)
    from ai_edge_litert.interpreter import Interpreter

    signature, names = next(iter(Interpreter(model_content=data).get_signature_list().items()))
    return {
        "file": FILE_NAME,
        "signature": signature,
        "input": names["inputs"][0],
        "outputs": described,
        "weights": "float32, the values the bundle's other formats carry",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


class Runtime:
    """A bundle's `model.tflite` in the LiteRT interpreter: `forward.Forward`'s pass without
    TensorFlow."""

    def __init__(self, folder: Path, block: dict, test_time: dict | None = None, threads: int | None = None):
        """Raises:
        MetadataError: the file is missing, or its SHA-256 is not the one metadata.json names.
        """
        path = Path(folder) / block.get("file", FILE_NAME)
        try:
            data = path.read_bytes()
        except OSError:
            raise MetadataError(
                f"{path}: missing, though metadata.json's export block names it; re-export the bundle."
            ) from None
        if hashlib.sha256(data).hexdigest() != block["sha256"]:
            raise MetadataError(
                f"{path}: its SHA-256 is not the one metadata.json records, so it is not the model "
                "exported with this bundle; re-export the bundle (pneumoscan export)."
            )
        self.data, self.signature, self.input = data, block["signature"], block["input"]
        self.threads = threads or os.cpu_count() or 1
        self.owner = threading.get_ident()
        self.local = threading.local()
        self.outputs = set(self.runner.get_output_details())
        self.shifts, self.fill = copies(test_time)

    @property
    def runner(self) -> Any:
        """The calling thread's interpreter (an interpreter runs one call at a time): on the
        thread that loaded the model it uses `threads` (every core); on any other, one thread,
        as such threads run beside each other (`stream.lanes`: each works one batch at a time on
        its own core, which keeps both cores busier than one interpreter's threads with the
        decoding competing for them)."""
        runner = getattr(self.local, "runner", None)
        if runner is None:
            from ai_edge_litert.interpreter import Interpreter

            owner = threading.get_ident() == self.owner
            interpreter = Interpreter(model_content=self.data, num_threads=self.threads if owner else 1)
            runner = interpreter.get_signature_runner(self.signature)
            shape = runner.get_input_details()[self.input]["shape"]
            # The first run of a process's first interpreter (the owner's, made when the model
            # loads) prints that it made the XNNPACK delegate; the line comes once a process, so
            # the lanes' interpreters never touch the process's stderr, which other threads use.
            with quiet_stderr() if owner else contextlib.nullcontext():
                runner(**{self.input: np.zeros((1, *shape[1:]), np.float32)})
            self.local.interpreter, self.local.runner = interpreter, runner
            self.local.threads = self.threads if owner else 1
        return runner

    def has(self, layer: str | None) -> bool:
        """Whether the flatbuffer outputs `layer` (None: the raw output alone, always)."""
        return layer is None or layer in self.outputs

    def __call__(
        self, images: Any, batch_size: int, layer: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """`forward.Forward.__call__` on the flatbuffer: (raw outputs float32 (n,), the named
        output float32 (n, ...) or None)."""
        shifts, fill = self.shifts, self.fill

        def run(films: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            batch = np.concatenate([shifted(films, dy, dx, fill) for dy, dx in shifts])
            result = self.runner(**{self.input: batch})
            count = films.shape[0]
            raw = result[RAW].reshape(len(shifts), count).mean(axis=0, dtype=np.float32)
            if not layer:
                return raw, None
            output = np.array(result[layer][:count], dtype=np.float32)  # a copy of the interpreter's
            return raw, output[..., 0] if layer == CAM and output.ndim == 4 else output

        return in_batches(run, np.asarray(images, dtype=np.float32), batch_size, layer)


def shifted(x: np.ndarray, dy: int, dx: int, fill: float = 0.0) -> np.ndarray:
    """`forward.shifted` in NumPy: (n, S, S, c) with the content moved down by dy and right by
    dx pixels, `fill` coming in (`perturb.translate` on each film); `x` itself for (0, 0)."""
    if (dy, dx) == (0, 0):
        return x
    return np.moveaxis(translate(np.moveaxis(x, 0, -1), dy, dx, fill), -1, 0)
