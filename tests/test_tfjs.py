"""Tests for `pneumoscan.tfjs` (`pneumoscan export`): TF.js must compute what Keras computes.

Each architecture gets random weights (and non-trivial BatchNorm statistics), is exported with
each quantization, and is run by Keras and by @tensorflow/tfjs 4.22 on the cpu backend in Node
(`tests/js/predict.mjs`). Quantized exports are checked twice: against Keras running the
dequantized weights (the encoding must be exact) and against the float32 model (the cost of
quantization must stay within the stated bound).
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import keras
import numpy as np
import pytest
from keras import layers

from conftest import DECODE_TOLERANCE, keras_predict, needs_node, tfjs_predict
from pneumoscan.bundle import tfjs_weights
from pneumoscan.config import RECIPES
from pneumoscan.model import build_pneumonet, build_seed
from pneumoscan.tfjs import SHARD_BYTES, named_weights, read_weights, write_tfjs

# Largest |probability difference| allowed between TF.js and the float32 Keras model.
FLOAT32_TOLERANCE = 1e-5
FLOAT16_TOLERANCE = 2e-3  # float16 keeps 11 significant bits: ~5e-4 relative per weight
UINT8_TOLERANCE = 5e-2  # 256 levels per tensor: up to range/510 absolute per weight
TOLERANCE = {"none": FLOAT32_TOLERANCE, "float16": FLOAT16_TOLERANCE, "uint8": UINT8_TOLERANCE}
LOGIT_SPREAD = 2.0  # std of the output logits the random weights are scaled to


def build_residual(image_size: int = 32) -> keras.Model:
    """A small model that uses every supported layer class the `seed` model does not."""
    inputs = keras.Input(shape=(image_size, image_size, 1), name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(inputs)
    x = layers.ZeroPadding2D(1, name="pad")(x)
    x = layers.Conv2D(8, 3, use_bias=False, name="stem")(x)  # (batch, 32, 32, 8)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    y = layers.SeparableConv2D(8, 3, padding="same", name="sep")(x)
    y = layers.BatchNormalization(name="sep_bn")(y)
    y = layers.Activation("swish", name="sep_swish")(y)
    y = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(y)
    y = layers.Activation("tanh", name="depthwise_tanh")(y)
    x = layers.Add(name="residual")([x, y])
    gate = layers.Conv2D(8, 1, activation="softmax", name="gate")(x)  # weights over channels
    x = layers.Multiply(name="gated")([x, gate])
    x = layers.ReLU(max_value=1.5, name="clip")(x)
    x = layers.MaxPooling2D(2, name="max_pool")(x)  # (batch, 16, 16, 8)
    x = layers.AveragePooling2D(2, name="avg_pool")(x)  # (batch, 8, 8, 8)
    x = layers.Dropout(0.2, name="dropout")(x)
    pooled = [
        layers.GlobalAveragePooling2D(name="global_avg")(x),
        layers.GlobalMaxPooling2D(name="global_max")(x),
    ]
    x = layers.Concatenate(name="pooled")(pooled)  # (batch, 16)
    x = layers.Dense(8, activation="relu", name="hidden")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    return keras.Model(inputs, outputs, name="residual")


# pneumonet at 36 px has feature maps of 9, 5, 3 and 2 pixels, so its shortcuts' average
# pooling pads odd maps ("same"), which tfjs must average over the valid pixels only, as Keras
# does. Float32 only: a deep network with random weights amplifies weight rounding far beyond what
# the trained model shows (BENCHMARKS.md, quantization).
# "pneumonet-standardised" adds the per-image standardisation (a LayerNormalization over the
# whole image, without weights) that `ModelConfig.standardise_input` puts before the stem.
ARCHITECTURES = {
    "seed": lambda: build_seed(64),
    "residual": build_residual,
    "pneumonet": lambda: build_pneumonet(36),
    "pneumonet-standardised": lambda: build_pneumonet(
        36, dataclasses.replace(RECIPES["pneumonet"].model, standardise_input=True)
    ),
}
QUANTIZED_ARCHITECTURES = ("seed", "residual")


def _images(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Blocky random images in [0, 255] of differing exposure and contrast, plus noise.

    With random weights, globally pooled features of pure noise barely differ between
    images; scaling such a model's logits apart would amplify any rounding of its weights.
    """
    blocks = np.ones((1, size // 4, size // 4, 1))
    pattern = np.kron(rng.uniform(-1, 1, size=(count, 4, 4, 1)), blocks)  # (count, size, size, 1)
    level = rng.uniform(40, 215, size=(count, 1, 1, 1))
    contrast = rng.uniform(10, 40, size=(count, 1, 1, 1))
    images = level + contrast * pattern + rng.normal(0, 10, size=pattern.shape)
    return images.clip(0, 255).astype(np.float32)


def _randomize(model: keras.Model, rng: np.random.Generator) -> None:
    """He-scaled kernels, small biases, BatchNorm statistics away from 0 mean / 1 variance."""
    for name, variable in named_weights(model):
        shape, kind = tuple(variable.shape), name.rsplit("/", 1)[1]
        if kind.endswith("kernel"):
            fan_in = np.prod(shape[:2]) if kind == "depthwise_kernel" else np.prod(shape[:-1])
            values = rng.normal(0, np.sqrt(2.0 / fan_in), size=shape)
        elif kind == "gamma":
            values = rng.uniform(0.5, 1.5, size=shape)
        elif kind == "moving_mean":
            values = rng.normal(0, 0.5, size=shape)
        elif kind == "moving_variance":
            values = rng.uniform(0.5, 2.0, size=shape)
        else:  # bias, beta
            values = rng.normal(0, 0.1, size=shape)
        variable.assign(values.astype(np.float32))


def _spread_logits(model: keras.Model, images: np.ndarray) -> None:
    """Scale the output layer so the logits spread around 0 and probabilities are not saturated."""
    head = model.get_layer("pneumonia")
    features = keras.Model(model.input, head.input)(images, training=False)
    logits = keras.ops.convert_to_numpy(features) @ head.kernel.numpy()
    scale = LOGIT_SPREAD / logits.std()
    head.kernel.assign(head.kernel.numpy() * scale)
    head.bias.assign(np.array([-logits.mean() * scale], dtype=np.float32))


@pytest.fixture(scope="module")
def prepared() -> dict:
    """Per architecture: the model with random weights, its inputs and its float32 outputs."""
    cache: dict = {}

    def get(arch: str) -> tuple[keras.Model, np.ndarray, np.ndarray]:
        if arch not in cache:
            rng = np.random.default_rng(20180222)
            model = ARCHITECTURES[arch]()
            images = _images(6, model.input_shape[1], rng)
            _randomize(model, rng)
            _spread_logits(model, images)
            cache[arch] = (model, images, keras_predict(model, images))
        return cache[arch]

    return get


def test_seed_at_64_pixels_is_the_expected_size():
    # 3,453,121 parameters at 150x150; the 64x64 input shrinks the first Dense to 512x512.
    assert build_seed(64).count_params() == 504_001


@needs_node
@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, quantize",
    [(arch, "none") for arch in sorted(ARCHITECTURES)]
    + [(arch, q) for arch in QUANTIZED_ARCHITECTURES for q in ("float16", "uint8")],
)
def test_tfjs_matches_keras(prepared, tmp_path, arch, quantize):
    model, images, expected = prepared(arch)
    assert expected.std() > 0.1 and expected.min() > 0.01 and expected.max() < 0.99
    model_dir = tmp_path / "model"
    write_tfjs(model, model_dir, quantize=quantize)

    outputs = tfjs_predict(model_dir, images, tmp_path)

    assert outputs.shape == expected.shape == (len(images), 1)
    with tfjs_weights(model, model_dir):
        exact = keras_predict(model, images)
    decode_error = np.abs(outputs - exact).max()
    assert decode_error <= DECODE_TOLERANCE, f"tfjs vs Keras on the stored weights: {decode_error}"
    error = np.abs(outputs - expected).max()
    assert error <= TOLERANCE[quantize], f"{arch}/{quantize}: max |Δp| {error}"


def _wide_model() -> keras.Model:
    """4.5 MB of float32 weights: more than one shard, with a kernel across the boundary."""
    inputs = keras.Input(shape=(1024,), name="features")
    x = layers.Dense(1100, activation="relu", name="wide")(inputs)
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid", name="pneumonia")(x))


def test_shards_are_bounded_little_endian_and_complete(tmp_path):
    model = _wide_model()
    summary = write_tfjs(model, tmp_path)

    shards = sorted(tmp_path.glob("group1-shard*.bin"))
    assert [path.name for path in shards] == ["group1-shard1of2.bin", "group1-shard2of2.bin"]
    sizes = [SHARD_BYTES, 4 * model.count_params() - SHARD_BYTES]
    assert [path.stat().st_size for path in shards] == sizes
    assert summary["files"] == ["model.json", *(path.name for path in shards)]
    assert summary["total_bytes"] == sum(path.stat().st_size for path in tmp_path.iterdir())
    decoded = read_weights(tmp_path)  # read as '<f4': equal only if written little-endian
    for name, variable in named_weights(model):
        np.testing.assert_array_equal(decoded[name], variable.numpy())


@needs_node
@pytest.mark.slow
def test_tfjs_loads_weights_split_across_shards(tmp_path):
    model = _wide_model()
    features = np.random.default_rng(1).normal(size=(3, 1024)).astype(np.float32)
    write_tfjs(model, tmp_path / "model")

    outputs = tfjs_predict(tmp_path / "model", features, tmp_path)

    np.testing.assert_allclose(outputs, keras_predict(model, features), atol=FLOAT32_TOLERANCE)


@needs_node
@pytest.mark.slow
def test_sequential_model_is_exported_as_a_graph(tmp_path):
    model = keras.Sequential(
        [
            keras.Input(shape=(12, 12, 1)),
            layers.Conv2D(4, 3, activation="relu", name="conv"),
            layers.Flatten(name="flatten"),
            layers.Dense(1, activation="sigmoid", name="pneumonia"),
        ],
        name="stack",
    )
    images = _images(2, 12, np.random.default_rng(2))
    write_tfjs(model, tmp_path / "model")

    outputs = tfjs_predict(tmp_path / "model", images, tmp_path)

    np.testing.assert_allclose(outputs, keras_predict(model, images), atol=FLOAT32_TOLERANCE)


def test_weight_names_are_layer_slash_weight(prepared, tmp_path):
    model, _, _ = prepared("residual")
    write_tfjs(model, tmp_path, quantize="float16")

    weights = json.loads((tmp_path / "model.json").read_text())["weightsManifest"][0]["weights"]
    names = {spec["name"] for spec in weights}
    assert not any(name.startswith(f"{model.name}/") for name in names)
    assert {
        "stem/kernel",
        "stem_bn/moving_variance",
        "sep/depthwise_kernel",
        "sep/pointwise_kernel",
        "depthwise/depthwise_kernel",
        "pneumonia/bias",
    } <= names
    assert "depthwise/kernel" not in names
    assert all(spec["quantization"] == {"dtype": "float16", "original_dtype": "float32"} for spec in weights)


def test_topology_is_in_the_form_tfjs_layers_reads(prepared, tmp_path):
    model, _, _ = prepared("seed")
    write_tfjs(model, tmp_path)

    model_json = json.loads((tmp_path / "model.json").read_text())
    topology = model_json["modelTopology"]
    by_name = {layer["name"]: layer for layer in topology["config"]["layers"]}
    assert model_json["format"] == "layers-model" and "pneumoscan" in model_json["convertedBy"]
    assert topology["class_name"] == "Model"
    assert topology["config"]["input_layers"] == [["image", 0, 0]]
    assert topology["config"]["output_layers"] == [["pneumonia", 0, 0]]
    assert by_name["image"]["config"]["batch_input_shape"] == [None, 64, 64, 1]
    assert by_name["gray_to_rgb"]["inbound_nodes"] == [[["rescale", 0, 0, {}]] * 3]
    assert by_name["conv1"]["config"]["dtype"] == "float32"
    assert "build_config" not in by_name["conv1"] and "kernel_initializer" not in by_name["conv1"]


def test_uint8_keeps_zero_exact_and_range(tmp_path):
    inputs = keras.Input(shape=(4,))
    model = keras.Model(inputs, layers.Dense(3, name="dense")(inputs))
    kernel = np.array([[-1.0, 0.0, 0.3], [2.0, -0.7, 0.0], [0.5, 1.1, -0.2], [0.0, 0.9, 1.9]])
    model.get_layer("dense").kernel.assign(kernel.astype(np.float32))
    model.get_layer("dense").bias.assign(np.full(3, 0.25, dtype=np.float32))
    write_tfjs(model, tmp_path, quantize="uint8")

    decoded = read_weights(tmp_path)

    assert np.all(decoded["dense/kernel"][kernel == 0.0] == 0.0)
    np.testing.assert_allclose(decoded["dense/kernel"], kernel, atol=3.0 / 255 / 2 + 1e-6)
    np.testing.assert_array_equal(decoded["dense/bias"], np.full(3, 0.25, dtype=np.float32))


def _model_with(layer: keras.layers.Layer, shape: tuple[int, ...]) -> keras.Model:
    inputs = keras.Input(shape=shape, name="image")
    return keras.Model(inputs, layer(inputs), name="probe")


def _rms_scaling_layer() -> layers.Layer:
    """A LayerNormalization with rms_scaling, which Keras 3 deprecates (and says so)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return layers.LayerNormalization(rms_scaling=True, name="rms")


@pytest.mark.parametrize(
    ("layer", "shape", "message"),
    [
        (layers.Lambda(lambda x: x * 2.0, name="double"), (8, 8, 1), "'double' of class Lambda"),
        (layers.LSTM(4, name="memory"), (5, 3), "'memory' of class LSTM"),
        (layers.Conv2D(4, 3, groups=2, name="grouped"), (8, 8, 4), "groups=2"),
        (layers.ReLU(negative_slope=0.1, name="leaky"), (8, 8, 1), "negative_slope=0.1"),
        (layers.Dense(2, activation="gelu", name="gelu"), (4,), "activation 'gelu'"),
        (layers.GlobalAveragePooling2D(keepdims=True, name="keep"), (8, 8, 1), "keepdims=True"),
        (layers.Rescaling([1.0, 2.0], name="per_channel"), (8, 8, 2), "per-channel"),
        (_rms_scaling_layer(), (8, 8, 1), "rms_scaling=True"),
        (
            layers.MaxPooling2D(2, data_format="channels_first", name="cf"),
            (1, 8, 8),
            "data_format 'channels_first'",
        ),
    ],
    ids=[
        "lambda",
        "lstm",
        "grouped-conv",
        "leaky-relu",
        "gelu",
        "keepdims",
        "per-channel",
        "rms-scaling",
        "channels-first",
    ],
)
def test_what_tfjs_cannot_reproduce_is_refused(tmp_path, layer, shape, message):
    with pytest.raises(ValueError, match=message):
        write_tfjs(_model_with(layer, shape), tmp_path)
    assert not (tmp_path / "model.json").exists()


@pytest.mark.parametrize("quantize", ["int8", "float32", "", "UINT8"])
def test_unknown_quantize_is_refused(tmp_path, quantize):
    model = _model_with(layers.Dense(1, name="dense"), (4,))
    with pytest.raises(ValueError, match="quantize must be one of"):
        write_tfjs(model, tmp_path, quantize=quantize)


def test_a_failed_re_export_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """The new files are written beside the folder and swapped in whole: a crash while writing
    leaves the earlier model.json with every shard it lists, and a finished re-export leaves no
    shard of the earlier one."""
    import pneumoscan.tfjs as tfjs_module

    wide, small = _wide_model(), _model_with(layers.Dense(1, name="pneumonia"), (4,))
    write_tfjs(wide, tmp_path / "model")
    assert len(list((tmp_path / "model").glob("group1-shard*.bin"))) == 2
    real = tfjs_module._write_shards

    def crash(data, out_dir):
        real(data, out_dir)
        raise OSError("disk full")

    monkeypatch.setattr(tfjs_module, "_write_shards", crash)
    with pytest.raises(OSError, match="disk full"):
        write_tfjs(small, tmp_path / "model")
    kept = read_weights(tmp_path / "model")  # raises if model.json lists a missing or short shard
    for name, variable in named_weights(wide):
        np.testing.assert_array_equal(kept[name], variable.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing half-written beside it

    monkeypatch.setattr(tfjs_module, "_write_shards", real)
    summary = write_tfjs(small, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == sorted(summary["files"])
    assert summary["files"] == ["model.json", "group1-shard1of1.bin"]


def test_a_folder_with_other_files_is_not_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds other files than a TF.js export \(notes.txt\)"):
        write_tfjs(_model_with(layers.Dense(1, name="dense"), (4,)), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
