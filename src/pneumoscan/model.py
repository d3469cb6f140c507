"""Architectures: `build_model(config)` and the registry behind `pneumoscan train --arch NAME`.

Every model takes (batch, size, size, 1) float32 luma in [0, 255] and returns (batch, 1), the
probability of PNEUMONIA. Scaling and channel copies are layers, so the exported model (and
the browser) need no preprocessing beyond decode, grayscale and resize.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from pneumoscan.config import RECIPES, Config, ModelConfig


def _gray_input(image_size: int, name: str = "image") -> keras.KerasTensor:
    return keras.Input(shape=(image_size, image_size, 1), dtype="float32", name=name)


def build_seed(image_size: int = 150, model: ModelConfig = RECIPES["seed"].model) -> keras.Model:
    """The CNN of Kermany et al. (2018): 3,453,121 parameters at 150x150x3.

    `model.widths` are the filters of the four 3x3 convolution + 2x2 max-pool blocks, then
    `model.dropout_rate` dropout, a dense layer of `model.dense_units` and the output unit.
    """
    inputs = _gray_input(image_size)
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = layers.Concatenate(axis=-1, name="gray_to_rgb")([x, x, x])  # (batch, 150, 150, 3)
    for index, filters in enumerate(model.widths, start=1):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{index}")(x)
        x = layers.MaxPooling2D(pool_size=2, strides=2, name=f"pool{index}")(x)
    x = layers.Flatten(name="flatten")(x)  # (batch, 7 * 7 * 128) at 150x150
    x = layers.Dropout(model.dropout_rate, name="dropout")(x)
    x = layers.Dense(model.dense_units, activation="relu", name="dense")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    return keras.Model(inputs, outputs, name="seed")


def _conv_bn(x, filters: int, kernel_size: int, strides: int, name: str, momentum: float, relu: bool = True):
    x = layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _residual_block(x, filters: int, name: str, momentum: float):
    """Two 3x3 convolutions, the first with stride 2, plus a shortcut that averages 2x2 pixels
    before its 1x1 convolution (ResNet-D)."""
    # Average-pool, then 1x1 convolution: a strided 1x1 would drop 3 of 4 pixels, and the
    # model's output would move more when the image shifts by a pixel.
    pooled = layers.AveragePooling2D(2, padding="same", name=f"{name}_short_pool")(x)
    shortcut = _conv_bn(pooled, filters, 1, 1, f"{name}_short", momentum, relu=False)
    y = _conv_bn(x, filters, 3, 2, f"{name}_a", momentum)
    y = _conv_bn(y, filters, 3, 1, f"{name}_b", momentum, relu=False)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


def build_pneumonet(image_size: int = 160, model: ModelConfig = RECIPES["pneumonet"].model) -> keras.Model:
    """A compact residual CNN on grayscale input, the project's default.

    A 4x4 stride-4 "patchify" stem of `model.stem_filters`, then one residual stage per entry of
    `model.widths` (48-96-160 filters), each halving the resolution, global average pooling and
    one sigmoid unit: 553,569 parameters, 0.076 GFLOPs at 160x160. Chosen by measuring training
    steps on this 2-core CPU: a stride-2 3x3 stem with four stages had fewer parameters but
    trained at half the speed, since TensorFlow's CPU convolutions are slow on few channels at
    high resolution. The first pneumonet had 64-128-192 filters and strided 1x1 shortcuts; how
    this one was chosen over it is in BENCHMARKS.md, "Recipe search" (third round).
    """
    momentum = model.batchnorm_momentum
    inputs = _gray_input(image_size)
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    if model.standardise_input:
        # Per-image standardisation: mean and variance over all of the image's pixels.
        x = layers.LayerNormalization(axis=[1, 2, 3], center=False, scale=False, name="standardise")(x)
    x = _conv_bn(x, model.stem_filters, 4, 4, "stem", momentum)  # (batch, 40, 40, 32) at 160
    for stage, filters in enumerate(model.widths, start=1):
        x = _residual_block(x, filters, f"stage{stage}", momentum)  # 20, 10, 5 pixels at 160
    x = layers.GlobalAveragePooling2D(name="pool")(x)  # (batch, 160)
    x = layers.Dropout(model.dropout_rate, name="dropout")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    return keras.Model(inputs, outputs, name="pneumonet")


# `--arch NAME` -> the function that builds it; each architecture's recipe is in config.RECIPES.
ARCHITECTURES: dict[str, Callable[[int, ModelConfig], keras.Model]] = {
    "pneumonet": build_pneumonet,
    "seed": build_seed,
}


def build_model(config: Config) -> keras.Model:
    """The architecture `config.arch` at `config.image_size`, uncompiled.

    Raises:
        ValueError: the architecture is unknown.
    """
    config = config.resolved()  # itself when resolved, as a run passes it
    return ARCHITECTURES[config.arch](config.image_size, config.model)


def count_flops(model: keras.Model) -> int:
    """Floating-point operations for one image's forward pass (2 x multiply-adds).

    Counts convolutions and dense layers, which dominate; batch norm, pooling, activations
    and additions (a fraction of a percent here) are left out.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D)):
            _, height, width, _ = layer.output.shape
            kernel = layer.get_weights()[0]
            if isinstance(layer, layers.SeparableConv2D):
                depthwise, pointwise = layer.get_weights()[:2]
                total += 2 * height * width * (depthwise.size + pointwise.size)
            else:  # Conv2D kernel (k, k, in, out); DepthwiseConv2D (k, k, in, multiplier)
                total += 2 * height * width * kernel.size
        elif isinstance(layer, layers.Dense):
            total += 2 * layer.get_weights()[0].size
    return int(total)


def heatmap_spec(model: keras.Model) -> dict:
    """How to compute the model's class activation map, for metadata.json and the page.

    `{"method": "cam", "feature_layer", "weights_layer"}` when global average pooling (and at
    most dropout) leads to the one-unit output layer; else `{"method": "grad-cam",
    "feature_layer"}` with the last layer whose output is a feature map.
    """
    stack = model.layers
    output = stack[-1]
    pools = [i for i, layer in enumerate(stack) if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    if pools and isinstance(output, keras.layers.Dense) and output.units == 1:
        between = stack[pools[-1] + 1 : -1]
        if all(isinstance(layer, keras.layers.Dropout) for layer in between):
            pool_input = stack[pools[-1]].input
            feature = next(layer for layer in stack if layer.output is pool_input)
            return {
                "method": "cam",
                "feature_layer": feature.name,
                "weights_layer": output.name,
                "peak": PEAK_RULE,
            }
    maps = [layer for layer in stack if len(layer.output.shape) == 4]
    return {"method": "grad-cam", "feature_layer": maps[-1].name, "peak": PEAK_RULE}


PEAK_RULE = (
    "centre of mass, in [0, 1] image coordinates of cell centres, of the cells where the map "
    "less its minimum is at least half its maximum"
)
