"""pneumoscan.config: validation, round trips and readable differences."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pneumoscan.config import RECIPES, AugmentConfig, Config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"batch_size": 0}, "batch size must be at least 1"),
        ({"learning_rate": 0.0}, "learning rate must be positive"),
        ({"val_fraction": 0.6}, "val fraction must be in"),
        ({"image_size": 8}, "image size must be between 32 and 1024"),
        ({"mixup": -0.1}, "mixup must be in"),
        ({"weight_average_momentum": 1.0}, "weight-average momentum must be in"),
        ({"test_time_shift": 0.3}, "test-time shift must be in"),
        ({"exclude_files": "NORMAL/a.jpeg"}, "exclude_files must be a list of paths"),
    ],
)
def test_invalid_values_are_value_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        Config(**changes)


def test_round_trip_and_resolution(tmp_path):
    config = Config(
        epochs=3, augment=AugmentConfig(zoom=0.2), exclude_files=("NORMAL/b.jpeg", "NORMAL/a.jpeg")
    ).resolved()
    assert config.exclude_files == ("NORMAL/a.jpeg", "NORMAL/b.jpeg")
    assert (config.arch, config.image_size, config.epochs, config.schedule) == ("pneumonet", 160, 3, "cosine")
    assert Config(arch="seed").resolved().image_size == 150
    config.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == config


def test_kermany2018_names_the_seed_architecture_and_runs_record_seed(tmp_path):
    """`--arch kermany2018` says what `seed` is; config.json keeps "seed", so runs made before
    the alias and after it compare equal on resume."""
    config = Config(arch="kermany2018", epochs=1)
    assert config == Config(arch="seed", epochs=1)
    assert config.resolved().image_size == RECIPES["seed"].image_size
    config.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["arch"] == "seed"
    assert Config.from_dict({"arch": "kermany2018"}).arch == "seed"


def test_differences_are_readable():
    old = Config(arch="seed", epochs=1).resolved()
    new = Config(arch="seed", epochs=2, augment=AugmentConfig(zoom=0.3)).resolved()
    assert old.differences(new) == ["augment.zoom: 0.1 -> 0.3", "epochs: 1 -> 2"]


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="unknown configuration keys: colour"):
        Config.from_dict({"colour": "blue"})


@pytest.mark.parametrize(
    "schedule, epoch, expected",
    [
        ("plateau", 0, 1e-3),
        ("plateau", 9, 1e-3),
        ("cosine", 0, 1e-3 / 3),
        ("cosine", 1, 2e-3 / 3),  # warm-up over 2 epochs
        ("cosine", 2, 1e-3),
        ("cosine", 6, 0.5e-3),
        ("cosine", 9, 1e-3 * (1 + np.cos(np.pi * 7 / 8)) / 2),
    ],
)
def test_learning_rate_schedule(schedule, epoch, expected):
    from pneumoscan.train import learning_rate_at

    config = Config(epochs=10, learning_rate=1e-3, schedule=schedule, warmup_epochs=2).resolved()
    assert learning_rate_at(config, epoch) == pytest.approx(expected)


def test_a_run_folder_from_before_the_renames_still_resumes(tmp_path):
    """config.json of earlier versions: `seed`, `augment.shift`, no `model` block."""
    current = Config(arch="seed", epochs=3, random_seed=7).resolved()
    old = current.to_dict()
    old["seed"] = old.pop("random_seed")
    old["augment"]["shift"] = old["augment"].pop("translation")
    del old["model"]
    loaded = Config.from_dict(old)
    assert (loaded.random_seed, loaded.augment.translation, loaded.model) == (7, 0.08, None)
    assert loaded.resolved().differences(current) == []


def test_threshold_rule_is_parsed_once_and_written_as_given(tmp_path):
    config = Config(threshold_rule="sensitivity:0.950")
    assert (config.threshold_rule.kind, config.threshold_rule.value) == ("sensitivity", 0.95)
    assert config.to_dict()["threshold_rule"] == "sensitivity:0.950"
    config.resolved().save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == config.resolved()
    with pytest.raises(ValueError, match="threshold rule 'median' is not understood"):
        Config(threshold_rule="median")


def test_the_default_operating_point_is_a_screening_sensitivity_and_old_runs_keep_theirs():
    assert (Config().threshold_rule.kind, Config().threshold_rule.value) == ("sensitivity", 0.9)
    old = Config(threshold_rule="youden").resolved().to_dict()
    assert Config.from_dict(old).threshold_rule.kind == "youden"


def test_model_hyper_parameters_come_from_the_recipe_and_can_be_changed():
    from pneumoscan.config import ModelConfig
    from pneumoscan.model import build_model

    assert Config().resolved().model == ModelConfig(
        widths=(48, 96, 160), stem_filters=32, dropout_rate=0.2, batchnorm_momentum=0.9
    )
    narrow = Config(image_size=64, model=ModelConfig(widths=(8, 16), stem_filters=4, batchnorm_momentum=0.5))
    model = build_model(narrow)
    names = [layer.name for layer in model.layers]
    assert model.get_layer("stage2_b_conv").filters == 16 and "stage3_out" not in names
    assert model.get_layer("stem_bn").momentum == 0.5 and model.get_layer("dropout").rate == 0.0
    with pytest.raises(ValueError, match="dropout rate must be in"):
        ModelConfig(widths=(8,), dropout_rate=1.0)


def test_a_run_folder_from_before_mixup_averaging_exclusions_and_copies_trains_without_them(tmp_path):
    saved = Config().resolved().to_dict()
    for key in ("mixup", "weight_average_momentum", "exclude_files", "test_time_shift"):
        del saved[key]
    legacy = Config.from_dict(saved)
    assert (legacy.mixup, legacy.weight_average_momentum, legacy.exclude_files) == (0.0, 0.0, ())
    assert legacy.test_time_shift == 0.0 and Config().test_time_shift == 0.04


def test_the_configuration_is_resolved_once_and_then_passed_on():
    config = Config(arch="seed", epochs=3)
    assert not config.is_resolved and config.epochs == 3 and config.batch_size is None
    resolved = config.resolved()
    assert resolved.is_resolved and resolved.batch_size == 32 and resolved.epochs == 3
    assert resolved.resolved() is resolved  # a stage that is handed it computes nothing again
    assert Config.from_dict(resolved.to_dict()).is_resolved  # as config.json records it
    assert not Config(arch="nope").is_resolved


def test_metadata_is_built_from_the_resolved_configuration_only():
    from pneumoscan import metadata

    with pytest.raises(ValueError, match="resolved configuration"):
        metadata.build(Config(arch="seed"), {}, {})
    built = metadata.build(Config(arch="seed", image_size=64).resolved(), {}, {})
    assert built["input"]["height"] == 64 and built["config"]["batch_size"] == 32
