"""`pneumoscan export`: write a Keras 3 model as a TensorFlow.js layers model.

The `tensorflowjs` converter cannot be installed next to TensorFlow 2.21, and tfjs-layers 4.22
cannot read Keras 3 model JSON as is, so this module writes the TF.js format itself:
`model.json` (topology in the tf.keras 2 form that tfjs-layers reads, plus the weights
manifest) and `group1-shard{i}of{n}.bin` files of little-endian weight data, at most 4 MiB each.

Only the layer classes in `SUPPORTED_LAYERS` are translated; each one is checked by
`tests/test_tfjs.py` to load in tfjs 4.22 and to give Keras' outputs. Anything else raises
`ValueError` at export time rather than producing a model that fails, or silently differs,
in the browser. Initializers, regularizers and constraints are left out: the export is for
inference, its weights are loaded from the shards, and tfjs would only try (and for some
Keras 3 initializers fail) to rebuild them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pneumoscan import __version__
from pneumoscan.atomic import recover_dir, replace_dir_atomic
from pneumoscan.metadata import TFJS_SHARD_NAME

QUANTIZE_OPTIONS = ("none", "float16", "uint8")
SHARD_BYTES = 4 * 1024 * 1024  # tfjs-converter's default shard size
MODEL_FILE = "model.json"

# Layer class -> the config keys tfjs-layers 4.22 reads for it (besides name, trainable, dtype).
_CONV_KEYS = {"kernel_size", "strides", "padding", "data_format", "dilation_rate", "activation", "use_bias"}
_POOL_KEYS = {"pool_size", "strides", "padding", "data_format"}
SUPPORTED_LAYERS: dict[str, set[str]] = {
    "InputLayer": {"batch_shape"},
    "Rescaling": {"scale", "offset"},
    "Concatenate": {"axis"},
    "Add": set(),
    "Multiply": set(),
    "Conv2D": _CONV_KEYS | {"filters"},
    "SeparableConv2D": _CONV_KEYS | {"filters", "depth_multiplier"},
    "DepthwiseConv2D": _CONV_KEYS | {"depth_multiplier"},
    "BatchNormalization": {"axis", "momentum", "epsilon", "center", "scale"},
    "LayerNormalization": {"axis", "epsilon", "center", "scale"},
    "MaxPooling2D": _POOL_KEYS,
    "AveragePooling2D": _POOL_KEYS,
    "GlobalAveragePooling2D": {"data_format"},
    "GlobalMaxPooling2D": {"data_format"},
    "ZeroPadding2D": {"padding", "data_format"},
    "Flatten": {"data_format"},
    "Dropout": {"rate", "noise_shape", "seed"},
    "Dense": {"units", "activation", "use_bias"},
    "Activation": {"activation"},
    "ReLU": {"max_value"},
}
# Keras 3 options tfjs lacks: exported (by dropping them) only while they hold these values.
_NEUTRAL_OPTIONS: dict[str, Any] = {
    "groups": 1,
    "keepdims": False,
    "negative_slope": 0.0,
    "threshold": 0.0,
    "sparse": False,
    "ragged": False,
    "optional": False,
    "quantization_config": None,
    "lora_rank": None,
    "lora_alpha": None,
    "renorm": False,
    "rms_scaling": False,
}
# Keras 3 options that do not change inference: distributed batch statistics, and the
# settings of batch renormalization, which is only exported while switched off.
_IGNORED_OPTIONS = {"synchronized", "renorm_clipping", "renorm_momentum"}
_IGNORED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")
# Keras activation name -> tfjs activation name, for the activations the tests verify.
ACTIVATIONS = {
    "linear": "linear",
    "relu": "relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "softmax": "softmax",
    "silu": "swish",
    "swish": "swish",
}
# Keras 3 variable names that tfjs-layers spells differently, by layer class.
_TFJS_WEIGHT_NAMES = {("DepthwiseConv2D", "kernel"): "depthwise_kernel"}


def write_tfjs(model: keras.Model, out_dir: Path, quantize: str = "none") -> dict:
    """Write `model` as a TF.js layers model (`model.json` plus weight shards) in `out_dir`.

    Args:
        model: A built functional (or Sequential) Keras 3 model made of `SUPPORTED_LAYERS`.
        out_dir: Folder to write; created if missing. An earlier export there is replaced
            whole and atomically (it may hold nothing but `model.json` and weight shards).
        quantize: `none` (float32), `float16`, or `uint8` (affine, per tensor). Quantized
            weights are dequantized by tfjs on load, as for tfjs-converter's output.

    Returns:
        `{"files": [names written], "total_bytes": int, "quantize": str}`.

    Raises:
        ValueError: for an unknown `quantize`, a layer class or option tfjs cannot reproduce,
            a dtype policy other than float32, a weight that is not finite, or an `out_dir`
            that holds other files than a TF.js export.
    """
    if quantize not in QUANTIZE_OPTIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_OPTIONS)}, not {quantize!r}.")
    model = _as_functional(model)
    topology = {
        "class_name": "Model",
        "config": _model_config(model),
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
    }
    specs, data = _encode_weights(model, quantize)
    out_dir = Path(out_dir)
    build = out_dir.with_name(f".{out_dir.name}.tfjs-new")
    recover_dir(out_dir, build)  # a crash inside an earlier swap
    _check_replaceable(out_dir)
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        shard_names = _write_shards(data, build)
        model_json = {
            "format": "layers-model",
            "generatedBy": f"pneumoscan {__version__} (Keras {keras.__version__})",
            "convertedBy": f"pneumoscan.tfjs {__version__}",
            "modelTopology": topology,
            "weightsManifest": [{"paths": shard_names, "weights": specs}],
        }
        (build / MODEL_FILE).write_text(json.dumps(model_json), encoding="utf-8")
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    # The whole folder is swapped in: a reader sees the old model.json with its old shards, or
    # the new one with its new shards, never a mix.
    replace_dir_atomic(build, out_dir)
    files = [MODEL_FILE, *shard_names]
    total = sum((out_dir / name).stat().st_size for name in files)
    return {"files": files, "total_bytes": total, "quantize": quantize}


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.is_dir():
        return
    others = sorted(
        p.name for p in out_dir.iterdir() if p.name != MODEL_FILE and not TFJS_SHARD_NAME.fullmatch(p.name)
    )
    if others:
        raise ValueError(
            f"{out_dir}: holds other files than a TF.js export ({', '.join(others[:3])}); "
            "write the export to an empty folder."
        )


def named_weights(model: keras.Model) -> list[tuple[str, keras.Variable]]:
    """The model's weights under the names tfjs-layers gives them: `layer_name/weight_name`.

    Raises:
        ValueError: if two weights would get the same name.
    """
    named: list[tuple[str, keras.Variable]] = []
    for layer in model.layers:
        for variable in layer.weights:
            short = _TFJS_WEIGHT_NAMES.get((type(layer).__name__, variable.name), variable.name)
            named.append((f"{layer.name}/{short}", variable))
    names = [name for name, _ in named]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Weight names repeat, so tfjs could not load them: {duplicates}.")
    return named


def _as_functional(model: keras.Model) -> keras.Model:
    """A functional view of `model` (a Sequential model's config has no graph to translate)."""
    if isinstance(model, keras.Sequential):
        if not model.built:
            raise ValueError(f"Model {model.name!r} is not built; call it or build it first.")
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def _model_config(model: keras.Model) -> dict:
    """The model's Keras 3 config in the tf.keras 2 form that tfjs-layers 4.22 deserializes."""
    config = model.get_config()
    if "layers" not in config:
        raise ValueError(
            f"Model {model.name!r} is not functional; only functional or "
            "Sequential models can be exported to TF.js."
        )
    layers = [_layer_entry(entry) for entry in config["layers"]]
    translated = {
        "name": config["name"],
        "trainable": config.get("trainable", True),
        "layers": layers,
        "input_layers": _endpoints(config["input_layers"], "input_layers"),
        "output_layers": _endpoints(config["output_layers"], "output_layers"),
    }
    _check_references(translated)
    return translated


def _layer_entry(entry: dict) -> dict:
    """One layer of the model config: class, translated config, name and inbound nodes."""
    class_name, name = entry["class_name"], entry["config"].get("name", entry.get("name"))
    module = entry.get("module") or "keras.layers"
    if class_name not in SUPPORTED_LAYERS or entry.get("registered_name") or not module.startswith("keras"):
        raise ValueError(
            f"Layer {name!r} of class {class_name} cannot be exported to TF.js; "
            f"supported classes: {', '.join(SUPPORTED_LAYERS)}."
        )
    return {
        "class_name": class_name,
        "config": _layer_config(class_name, entry["config"]),
        "name": name,
        "inbound_nodes": [_node(node, name) for node in entry.get("inbound_nodes", [])],
    }


def _layer_config(class_name: str, config: dict) -> dict:
    """Keep the options tfjs reads for `class_name`; refuse the ones it would get wrong."""
    name = config.get("name")
    allowed = SUPPORTED_LAYERS[class_name] | {"name", "trainable", "dtype"}
    translated: dict[str, Any] = {}
    for key, value in config.items():
        if key in _IGNORED_OPTIONS or key.endswith(_IGNORED_SUFFIXES):
            continue
        if key in _NEUTRAL_OPTIONS and key not in allowed:
            if value != _NEUTRAL_OPTIONS[key]:
                raise ValueError(
                    f"Layer {name!r} ({class_name}) sets {key}={value!r}, "
                    "which TF.js layers cannot reproduce."
                )
            continue
        if key not in allowed:
            raise ValueError(
                f"Layer {name!r} ({class_name}) has option {key!r}, "
                "which this exporter does not know how to translate."
            )
        translated[key] = _option(key, value, name)
    if class_name == "Rescaling" and not all(
        isinstance(translated.get(key, 0.0), (int, float)) for key in ("scale", "offset")
    ):
        raise ValueError(
            f"Layer {name!r} (Rescaling) has a per-channel scale or offset; "
            "TF.js export supports single numbers."
        )
    if class_name == "InputLayer":
        translated["batch_input_shape"] = translated.pop("batch_shape")
        translated.setdefault("dtype", "float32")
    return translated


def _option(key: str, value: Any, layer_name: str) -> Any:
    """One option value in tfjs form: dtype policies as strings, activations by tfjs name."""
    if key == "dtype":
        policy = value["config"]["name"] if isinstance(value, dict) else value
        if policy != "float32":
            raise ValueError(
                f"Layer {layer_name!r} uses dtype policy {policy!r}; TF.js export needs float32."
            )
        return policy
    if key == "data_format" and value != "channels_last":
        raise ValueError(
            f"Layer {layer_name!r} uses data_format {value!r}; TF.js export supports channels_last."
        )
    if key == "activation":
        if not isinstance(value, str) or value not in ACTIVATIONS:
            raise ValueError(
                f"Layer {layer_name!r} uses activation {value!r}; TF.js export "
                f"supports {', '.join(sorted(ACTIVATIONS))}."
            )
        return ACTIVATIONS[value]
    return list(value) if isinstance(value, tuple) else value


def _node(node: dict, layer_name: str) -> list[list]:
    """A Keras 3 call node `{args, kwargs}` as a tf.keras 2 node: `[[name, node, tensor, {}], ...]`.

    A multi-input layer's inputs are one list of tensors in `args[0]`; they become the node's
    entries side by side (one more level of nesting makes tfjs wait forever for a layer).
    """
    args = node.get("args", [])
    # Keras 3 records `training=False` and `mask=None` on symbolic calls; tfjs' predict runs
    # in inference mode anyway. `training=True` (dropout at inference) it could not reproduce.
    kwargs = {
        key: value
        for key, value in node.get("kwargs", {}).items()
        if value is not None and not (key == "training" and value is False)
    }
    if len(args) != 1 or kwargs:
        raise ValueError(
            f"Layer {layer_name!r} is called with arguments other than its input "
            f"tensors ({len(args)} positional, keyword {sorted(kwargs)}); "
            "TF.js export cannot reproduce that call."
        )
    tensors = args[0] if isinstance(args[0], list) else [args[0]]
    entries = []
    for tensor in tensors:
        if not (isinstance(tensor, dict) and tensor.get("class_name") == "__keras_tensor__"):
            raise ValueError(
                f"Layer {layer_name!r} takes a constant input; TF.js export needs "
                "every input to be a tensor of the model."
            )
        inbound, node_index, tensor_index = tensor["config"]["keras_history"]
        entries.append([inbound, node_index, tensor_index, {}])
    return entries


def _endpoints(value: Any, key: str) -> list[list]:
    """`input_layers` / `output_layers` as a list of `[name, node, tensor]` triples."""
    if isinstance(value, dict):
        raise ValueError(f"Models with named (dict) {key} cannot be exported to TF.js.")
    if len(value) == 3 and isinstance(value[0], str):
        value = [value]  # Keras 3 writes a single endpoint flat.
    return [list(item) for item in value]


def _check_references(config: dict) -> None:
    """Every node and endpoint must name a layer defined before it (else tfjs loops forever)."""
    seen: set[str] = set()
    for layer in config["layers"]:
        for node in layer["inbound_nodes"]:
            for inbound, *_ in node:
                if inbound not in seen:
                    raise ValueError(
                        f"Layer {layer['name']!r} takes input from {inbound!r}, "
                        "which is not an earlier layer of the model."
                    )
        seen.add(layer["name"])
    for name, *_ in config["input_layers"] + config["output_layers"]:
        if name not in seen:
            raise ValueError(f"Model endpoint {name!r} is not a layer of the model.")


def _encode_weights(model: keras.Model, quantize: str) -> tuple[list[dict], bytes]:
    """The manifest entries and the concatenated little-endian bytes of every weight."""
    specs, chunks = [], []
    for name, variable in named_weights(model):
        values = np.asarray(variable.numpy())
        if values.dtype != np.float32:
            raise ValueError(f"Weight {name!r} is {values.dtype}; TF.js export needs float32.")
        if not np.isfinite(values).all():
            raise ValueError(f"Weight {name!r} holds NaN or infinite values.")
        data, quantization = _encode(values, quantize, name)
        spec = {"name": name, "shape": list(values.shape), "dtype": "float32"}
        if quantization is not None:
            spec["quantization"] = quantization
        specs.append(spec)
        chunks.append(data)
    return specs, b"".join(chunks)


def _encode(values: np.ndarray, quantize: str, name: str) -> tuple[bytes, dict | None]:
    """One weight's bytes and its manifest `quantization` entry (None for float32)."""
    if quantize == "none":
        return values.astype("<f4").tobytes(), None
    if quantize == "float16":
        half = values.astype("<f2")
        if not np.isfinite(half).all():
            raise ValueError(f"Weight {name!r} exceeds the float16 range (|w| > 65504).")
        return half.tobytes(), {"dtype": "float16", "original_dtype": "float32"}
    quantized, minimum, scale = _affine_uint8(values)
    quantization = {"dtype": "uint8", "min": minimum, "scale": scale, "original_dtype": "float32"}
    return quantized.tobytes(), quantization


def _affine_uint8(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """tfjs-converter's per-tensor affine uint8 quantization: `w ≈ q * scale + min`.

    The range is nudged so that 0 maps exactly to an integer when the range covers it (zero
    padding and ReLU zeros stay exact), as in TF Lite's `NudgeQuantizationRange`.
    """
    low, high = float(values.min()), float(values.max())
    if low == high:
        return np.zeros(values.shape, dtype=np.uint8), low, 1.0
    scale = (high - low) / 255.0
    if low <= 0.0 <= high:
        low = -round(-low / scale) * scale
        high = 255.0 * scale + low
    quantized = np.round((values.astype(np.float64).clip(low, high) - low) / scale)
    return quantized.astype(np.uint8), low, scale


def _write_shards(data: bytes, out_dir: Path) -> list[str]:
    """Split `data` into `group1-shard{i}of{n}.bin` files of at most `SHARD_BYTES` each."""
    count = max(1, math.ceil(len(data) / SHARD_BYTES))
    names = [f"group1-shard{index}of{count}.bin" for index in range(1, count + 1)]
    for index, name in enumerate(names):
        (out_dir / name).write_bytes(data[index * SHARD_BYTES : (index + 1) * SHARD_BYTES])
    return names


def read_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """An export's weights as TF.js reads them (little-endian, dequantized), by manifest name.

    Used to measure what quantization costs, with the exact weights the browser will run.
    """
    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / MODEL_FILE).read_text())["weightsManifest"]
    weights: dict[str, np.ndarray] = {}
    for group in manifest:
        data = b"".join((model_dir / path).read_bytes() for path in group["paths"])
        offset = 0
        for spec in group["weights"]:
            quantization = spec.get("quantization", {"dtype": "float32"})
            dtype = {"float32": "<f4", "float16": "<f2", "uint8": "u1"}[quantization["dtype"]]
            count = int(np.prod(spec["shape"]))
            raw = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
            offset += raw.nbytes
            if quantization["dtype"] == "uint8":
                raw = raw * quantization["scale"] + quantization["min"]
            weights[spec["name"]] = raw.astype(np.float32).reshape(spec["shape"])
        if offset != len(data):
            raise ValueError(f"{model_dir}: the shards hold bytes that no weight accounts for.")
    return weights
