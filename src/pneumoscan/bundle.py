"""The model bundle, the type every stage passes around: `pneumoscan predict|evaluate|explain|export`.

A model folder is a training run folder (`model.keras`, `metadata.json`, `splits.json`, ...) or
an exported bundle (the same plus `tfjs/`, `saved_model/`, `model.h5`). `Bundle` is one loaded:
the Keras model, its metadata (input size, class names, calibration, threshold), and

- `forward`: the one batched forward pass (`pneumoscan.forward`), raw sigmoid outputs for model
  inputs, which predict, evaluate, explain, training's calibration, the export checks and the
  benchmarks all call (averaged over the test-time copies that metadata.json's `test_time`
  names, when it does); `forward_features` is the same pass that also returns an inner layer's
  output (the features of the out-of-distribution score, `pneumoscan.ood`);
- `decision`: the metadata's calibration, threshold, borderline band and out-of-distribution
  rule (`pneumoscan.decision`), read once; `calibrated`, `label` and `borderline` apply its parts
  to single outputs.

`tfjs_weights` puts the weights of a TF.js export (dequantized exactly as TF.js reads them) into
a Keras model, so Python can compute what the browser computes.

A bundle exported with its LiteRT flatbuffer (`model.tflite`, `pneumoscan.litert`) runs the
forward pass there when `ai_edge_litert` imports: then Keras and TensorFlow are imported only
when something asks for `Bundle.model` (training, export, Grad-CAM, occlusion on a model without
CAM, a layer the flatbuffer lacks), so predict, evaluate and explain --method cam never do.
Otherwise they are imported when the model is loaded, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan import metadata as metadata_io
from pneumoscan import run_folder
from pneumoscan.decision import Calibration, Decision
from pneumoscan.errors import ModelNotFound
from pneumoscan.forward import INFERENCE_BATCH, Forward, import_tensorflow, shifted  # noqa: F401  (shifted: older imports)


def bundled_dir() -> Path | None:
    """The model committed as package data (`src/pneumoscan/bundled`), when there is one."""
    folder = Path(str(resources.files("pneumoscan") / "bundled"))
    return folder if (folder / metadata_io.FILE_NAME).is_file() else None


def find(model: str | Path | None) -> Path:
    """The model folder for `--model`: as given, or the bundled model when None.

    Raises:
        ModelNotFound: no bundled model, or the folder lacks model.keras or metadata.json.
    """
    if model is None:
        bundled = bundled_dir()
        if bundled is None:
            raise ModelNotFound(
                "no --model given and this installation has no bundled model; "
                "pass --model RUN_DIR (a folder made by pneumoscan train)."
            )
        return bundled
    folder = Path(model)
    if not (folder / run_folder.MODEL).is_file() or not (folder / run_folder.METADATA).is_file():
        raise ModelNotFound(f"{folder}: not a model folder (needs model.keras and metadata.json).")
    return folder


class Bundle:
    """A loaded model folder: its metadata.json, the Keras model (loaded when first needed), and
    the LiteRT runtime of its `model.tflite` when it has one and LiteRT imports."""

    def __init__(self, folder: Path, model: Any, metadata: dict, runtime: Any = None):
        """`model`: a Keras model, or None to load the folder's model.keras on first use;
        `runtime`: a `litert.Runtime` that runs the forward pass instead of Keras, or None."""
        self.folder, self._model, self.metadata = Path(folder), model, metadata
        self.runtime = runtime
        self._forward: Forward | None = None  # built on first use
        self._decision: tuple | None = None  # (metadata, Decision)

    def __repr__(self) -> str:
        return f"Bundle({str(self.folder)!r}, runtime={'litert' if self.runtime else 'keras'})"

    @property
    def model(self) -> Any:
        """The Keras model (keras.Model), loaded from the folder's model.keras the first time
        something asks for it (training, export, Grad-CAM, a layer the flatbuffer lacks)."""
        if self._model is None:
            import_tensorflow()
            import keras

            self._model = keras.models.load_model(self.folder / run_folder.MODEL, compile=False)
        return self._model

    @model.setter
    def model(self, model: Any) -> None:
        self._model, self._forward = model, None

    @classmethod
    def load(cls, model: str | Path | Bundle | None = None, runtime: str = "auto") -> Bundle:
        """A folder (`find` rules; None is the bundled model), or a Bundle as it is.

        `runtime`: "auto" runs the forward pass on the folder's LiteRT flatbuffer when
        metadata.json names one (`export.litert`), the file is there and `ai_edge_litert`
        imports, else on Keras; "keras" always on Keras; "litert" on LiteRT or ModelNotFound.

        Raises:
            ModelNotFound: see `find`; or `runtime="litert"` and no flatbuffer or no LiteRT.
            MetadataError: metadata.json is missing, breaks the schema, or holds a calibration or
                borderline band that cannot be applied; or the flatbuffer's SHA-256 is not the
                one metadata.json records.
        """
        if isinstance(model, Bundle):
            return model
        folder = find(model)
        metadata = metadata_io.read(folder)
        decision = Decision.from_metadata(metadata, str(folder / metadata_io.FILE_NAME))  # refused here
        engine = None
        if runtime != "keras":
            from pneumoscan import litert

            block = metadata.get("export", {}).get("litert")
            usable = block is not None and (folder / block["file"]).is_file() and litert.available()
            if usable:
                engine = litert.Runtime(folder, block, metadata.get("test_time"))
            elif runtime == "litert":
                raise ModelNotFound(
                    f"{folder}: cannot run on LiteRT (no model.tflite named in its metadata.json, "
                    "or ai-edge-litert is not installed)."
                )
        bundle = cls(folder, None, metadata, engine)
        if engine is None:
            bundle.model  # noqa: B018  (loaded now, as before: a broken model.keras fails here)
        bundle._decision = (metadata, decision)
        return bundle

    @property
    def image_size(self) -> int:
        return int(self.metadata["input"]["height"])

    @property
    def decision(self) -> Decision:
        """The metadata's decision (`Decision.from_metadata`), read once per metadata object."""
        if self._decision is None or self._decision[0] is not self.metadata:
            self._decision = (self.metadata, Decision.from_metadata(self.metadata))
        return self._decision[1]

    @property
    def digest(self) -> str:
        """`metadata.digest` of the model's folder (the SHA-256 of its metadata.json), or "" for
        a bundle built in memory without one."""
        if not (self.folder / metadata_io.FILE_NAME).is_file():
            return ""
        return metadata_io.digest(self.folder)

    def check_input(self, x: Any) -> np.ndarray:
        """`x` as float32, or ValueError unless it is one (S, S, 1) input of this model."""
        image = np.asarray(x, dtype=np.float32)
        size = self.image_size
        if image.shape != (size, size, 1):
            raise ValueError(f"expected one ({size}, {size}, 1) model input; got shape {image.shape}")
        return image

    @property
    def threshold(self) -> float:
        return self.decision.threshold

    def forward(self, images: Any, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
        """Raw model outputs, float32 (n,), for (n, S, S, 1) float32 inputs in [0, 255].

        `images` may be a NumPy array or a tensor. It runs `batch_size` images at a time through
        one compiled function (traced once per batch shape), in inference mode; a call with at
        most `forward.EAGER_AT_MOST` films runs the same operations eagerly, without the graph's start-up.
        """
        return self.forward_features(images, batch_size)[0]

    def forward_features(
        self, images: Any, batch_size: int = INFERENCE_BATCH, layer: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """`forward`, and in the same pass the output of the named inner layer: (raw outputs
        float32 (n,), that layer's output float32 (n, ...) or None when `layer` is None), as
        `forward.Forward` defines them (the page builds the same two-output model in forward.js).
        The test-time copies are those of the metadata when the model first runs."""
        if self.runtime is not None and self.runtime.has(layer):
            return self.runtime(images, batch_size, layer)
        if self._forward is None:
            self._forward = Forward(self.model, self.metadata.get("test_time"))
        return self._forward(images, batch_size, layer)

    def calibrated(self, raw: Any) -> np.ndarray:
        """The metadata's calibration applied to raw outputs: float64 probabilities. It needs the
        `calibration` block alone, so a hand-built bundle without a threshold can run it."""
        return Calibration.from_block(self.metadata["calibration"]).apply(raw)

    def probabilities(self, images: Any, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
        """Calibrated probabilities of PNEUMONIA, float64 (n,), for model inputs."""
        return np.asarray(self.calibrated(self.forward(images, batch_size)), dtype=np.float64).reshape(-1)

    def label(self, probability: float) -> str:
        return self.decision.label(probability)

    def borderline(self, probability: float) -> bool | None:
        """Whether a calibrated probability falls in metadata.json's borderline band
        (`calibrate.in_band`); None for a model without one."""
        band = self.decision.band
        return None if band is None else bool(band.contains(probability))


def set_named_weights(model: Any, weights: dict[str, np.ndarray]) -> None:
    """Assign weights named as TF.js names them (`layer/weight`, `tfjs.named_weights`).

    Raises:
        KeyError: `weights` lacks one of the model's weights.
    """
    from pneumoscan.tfjs import named_weights

    for name, variable in named_weights(model):
        variable.assign(weights[name])


@contextlib.contextmanager
def tfjs_weights(model: Any, weights: Path | dict[str, np.ndarray]) -> Iterator[Any]:
    """`model` with the weights of a TF.js export inside the block; its own are restored after.

    Args:
        model: a Keras model with the export's architecture.
        weights: a `tfjs/` folder (read as TF.js reads it: little-endian, dequantized) or the
            weights already read (`tfjs.read_weights`).
    """
    from pneumoscan.tfjs import named_weights, read_weights

    if not isinstance(weights, dict):
        weights = read_weights(Path(weights))
    original = {name: variable.numpy() for name, variable in named_weights(model)}
    set_named_weights(model, weights)
    try:
        yield model
    finally:
        set_named_weights(model, original)
