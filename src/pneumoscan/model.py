"""Architectures: `build_model(config)` and the registry behind `pneumoscan train --arch NAME`.

Every model takes (batch, size, size, 1) float32 luma in [0, 255] and returns (batch, 1), the
probability of PNEUMONIA. Scaling and channel copies are layers, so the exported model (and
the browser) need no preprocessing beyond decode, grayscale and resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras
from keras import layers

from pneumoscan.config import Config


@dataclass(frozen=True)
class Architecture:
    build: Callable[[int], keras.Model]
    default_image_size: int
    description: str


def _gray_input(image_size: int, name: str = "image") -> keras.KerasTensor:
    return keras.Input(shape=(image_size, image_size, 1), dtype="float32", name=name)


def build_seed(image_size: int = 150) -> keras.Model:
    """The CNN of Kermany et al. (2018): 3,453,121 parameters at 150x150x3."""
    inputs = _gray_input(image_size)
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    x = layers.Concatenate(axis=-1, name="gray_to_rgb")([x, x, x])  # (batch, 150, 150, 3)
    for index, filters in enumerate((32, 64, 128, 128), start=1):
        x = layers.Conv2D(filters, 3, activation="relu", name=f"conv{index}")(x)
        x = layers.MaxPooling2D(pool_size=2, strides=2, name=f"pool{index}")(x)
    x = layers.Flatten(name="flatten")(x)  # (batch, 7 * 7 * 128) at 150x150
    x = layers.Dropout(0.5, name="dropout")(x)
    x = layers.Dense(512, activation="relu", name="dense")(x)
    outputs = layers.Dense(1, activation="sigmoid", name="pneumonia")(x)
    return keras.Model(inputs, outputs, name="seed")


ARCHITECTURES: dict[str, Architecture] = {
    "seed": Architecture(build_seed, 150, "the paper's CNN (Kermany et al., 2018)"),
}


def build_model(config: Config) -> keras.Model:
    """The architecture `config.arch` at `config.image_size`, uncompiled."""
    config = config.resolved()
    return ARCHITECTURES[config.arch].build(config.image_size)
