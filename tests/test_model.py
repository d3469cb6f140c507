"""pneumoscan.model: the paper's CNN exactly, and every registered architecture trains."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from conftest import SAMPLES
from pneumoscan.config import Config
from pneumoscan.model import ARCHITECTURES, build_model
from pneumoscan.preprocess import decode_to_input
from pneumoscan.train import compile_model

SEED_LAYERS = [
    ("InputLayer", (None, 150, 150, 1)),
    ("Rescaling", (None, 150, 150, 1)),
    ("Concatenate", (None, 150, 150, 3)),
    ("Conv2D", (None, 148, 148, 32)),
    ("MaxPooling2D", (None, 74, 74, 32)),
    ("Conv2D", (None, 72, 72, 64)),
    ("MaxPooling2D", (None, 36, 36, 64)),
    ("Conv2D", (None, 34, 34, 128)),
    ("MaxPooling2D", (None, 17, 17, 128)),
    ("Conv2D", (None, 15, 15, 128)),
    ("MaxPooling2D", (None, 7, 7, 128)),
    ("Flatten", (None, 6272)),
    ("Dropout", (None, 6272)),
    ("Dense", (None, 512)),
    ("Dense", (None, 1)),
]


def test_seed_is_the_papers_cnn():
    model = build_model(Config(arch="seed"))
    assert model.count_params() == 3_453_121
    assert [(layer.__class__.__name__, tuple(layer.output.shape)) for layer in model.layers] == SEED_LAYERS
    assert model.layers[1].scale == pytest.approx(1 / 255)
    assert model.layers[-1].activation.__name__ == "sigmoid"
    assert model.layers[-2].activation.__name__ == "relu"
    assert model.get_layer("dropout").rate == 0.5


def test_unknown_architecture_is_a_value_error():
    with pytest.raises(ValueError, match="unknown architecture 'nope'; choose one of"):
        build_model(Config(arch="nope"))


# Sizes whose feature maps turn odd at some stage (150 -> 38 -> 19 -> 10) as well as even ones.
@pytest.mark.parametrize(
    "arch, image_size", [(arch, size) for arch in sorted(ARCHITECTURES) for size in (64, 150, 97)]
)
def test_output_shape_range_and_no_nans(arch, image_size):
    model = build_model(Config(arch=arch, image_size=image_size))
    x = np.random.default_rng(0).uniform(0, 255, (3, image_size, image_size, 1)).astype(np.float32)
    y = model.predict(x, verbose=0)
    assert y.shape == (3, 1)
    assert np.all(np.isfinite(y)) and np.all((y >= 0) & (y <= 1))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_overfits_one_small_batch(arch):
    keras.utils.set_random_seed(0)
    paths = sorted(SAMPLES.rglob("*.jpeg"))
    x = np.stack([decode_to_input(p, 64) for p in paths])
    y = np.array([p.parent.name == "PNEUMONIA" for p in paths], np.float32)
    model = build_model(Config(arch=arch, image_size=64))
    compile_model(model, learning_rate=1e-3)
    first = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    # The training-mode loss: batch-norm moving statistics need more than 100 steps to settle.
    history = model.fit(x, y, epochs=100, batch_size=16, verbose=0).history
    assert history["loss"][-1] < 0.1 * first
    assert history["accuracy"][-1] == 1.0


@pytest.mark.parametrize(
    "arch, image_size, expected",
    [
        # conv 148^2*9*3*32 + 72^2*9*32*64 + 34^2*9*64*128 + 15^2*9*128^2, dense 6272*512 + 512
        ("seed", 150, 2 * (148**2 * 864 + 72**2 * 18432 + 34**2 * 73728 + 15**2 * 147456 + 6272 * 512 + 512)),
    ],
)
def test_flops_by_hand(arch, image_size, expected):
    from pneumoscan.model import count_flops

    assert count_flops(build_model(Config(arch=arch, image_size=image_size))) == expected


def test_pneumonet_budget():
    """The default model within the limits, its test-time copies counted: every copy is a pass."""
    from pneumoscan.metadata import copies_block
    from pneumoscan.model import count_flops

    config = Config(arch="pneumonet").resolved()
    model = build_model(config)
    passes = len(copies_block(config.image_size, config.test_time_shift)["shifts"])
    assert model.count_params() <= 1_000_000
    assert passes == 3 and passes * count_flops(model) <= 0.3e9


def test_standardised_input_ignores_exposure_and_contrast():
    """With `standardise_input` the stem sees each image at mean 0 and deviation 1, so a film
    exposed or contrasted otherwise reaches it nearly unchanged (epsilon 1e-3 is added to a
    variance near 0.05); without it there is no such layer."""
    import dataclasses

    from pneumoscan.config import RECIPES

    films = np.random.default_rng(3).uniform(20, 230, (4, 32, 32, 1)).astype(np.float32)
    other = np.clip(0.8 * films + 30, 0, 255)  # brighter, flatter
    for standardise in (False, True):
        small = dataclasses.replace(
            RECIPES["pneumonet"].model, widths=(8,), stem_filters=8, standardise_input=standardise
        )
        model = build_model(Config(arch="pneumonet", image_size=32, model=small))
        assert ("standardise" in [layer.name for layer in model.layers]) == standardise
    seen = keras.Model(model.input, model.get_layer("standardise").output)
    first, second = np.asarray(seen(films)), np.asarray(seen(other))
    np.testing.assert_allclose(first.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(first.std(axis=(1, 2, 3)), 1, atol=0.02)
    assert np.abs(first - second).max() < 0.05 < np.abs(films - other).max() / 255
