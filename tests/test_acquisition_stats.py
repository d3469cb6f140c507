"""The acquisition validation design: statistics, the regression, the split it makes, and runs
that keep working from their splits.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_xray, write_class_folders
from pneumoscan import acquisition_stats
from pneumoscan.config import Config
from pneumoscan.data import DataError, load_splits, rebuild_splits, scan, split_digest

FLAT = np.full((224, 224), 120, np.uint8)


def _with_text(gray: np.ndarray, corner: str) -> np.ndarray:
    out = gray.copy()
    columns = slice(180, 215) if corner == "right" else slice(10, 45)
    out[8:20, columns] = 250
    return out


def _stripes() -> np.ndarray:
    return np.tile(np.where(np.arange(224) % 4 < 2, 60, 200).astype(np.uint8), (224, 1))


def _blurred(gray: np.ndarray) -> np.ndarray:
    from PIL import ImageFilter

    return np.asarray(Image.fromarray(gray).filter(ImageFilter.GaussianBlur(2)))


@pytest.mark.parametrize(
    ("name", "image", "feature", "check"),
    [
        ("flat film has no range", FLAT, "range", lambda v: v == 0),
        ("flat film has no texture", FLAT, "lap_logvar", lambda v: v < -20),
        ("flat film's mean", FLAT, "mean", lambda v: v == 120),
        ("text top right", _with_text(FLAT, "right"), "text_tr", lambda v: v > 0.05),
        ("text top right is not top left", _with_text(FLAT, "right"), "text_tl", lambda v: v == 0),
        ("text top left", _with_text(FLAT, "left"), "text_tl", lambda v: v > 0.05),
        ("stripes span the range", _stripes(), "range", lambda v: v == 140),
    ],
)
def test_statistics_table(name, image, feature, check):
    value = acquisition_stats.statistics(image)[acquisition_stats.FEATURES.index(feature)]
    assert check(value), f"{name}: {feature} = {value}"


def test_blur_lowers_sharpness_and_other_sizes_are_measured_at_224():
    sharp = synthetic_xray(3, 0, size=(224, 224))
    lap = acquisition_stats.FEATURES.index("lap_logvar")
    assert acquisition_stats.statistics(_blurred(sharp))[lap] < acquisition_stats.statistics(sharp)[lap] - 1
    big = np.asarray(Image.fromarray(sharp).resize((448, 448), Image.Resampling.NEAREST))
    np.testing.assert_allclose(
        acquisition_stats.statistics(big)[acquisition_stats.FEATURES.index("mean")], sharp.mean(), atol=1
    )


def test_logistic_regression_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)) * [1, 5, 0.2, 3] + [0, 10, 1, -2]
    y = (x[:, 0] + 0.3 * x[:, 1] + rng.normal(size=300) > 3.5).astype(int)  # imbalanced
    fitted = acquisition_stats.fit_logistic(x, y)
    scaled = StandardScaler().fit_transform(x)
    reference = LogisticRegression(C=1.0, class_weight="balanced", tol=1e-10, max_iter=1000).fit(scaled, y)
    np.testing.assert_allclose(
        acquisition_stats.score(x, fitted), reference.predict_proba(scaled)[:, 1], atol=1e-5
    )


def test_out_of_fold_scores_never_score_a_group_with_its_own_model():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 2))
    y = np.array([0, 1] * 30)
    groups = [i // 2 for i in range(60)]  # each group: one of each label
    x[:, 0] += 3 * y
    # a memorising model would score group 0's rows by their own labels; a group is held out
    # whole, so its pair gets the same fold and the scores are those of a model without it
    scores = acquisition_stats.out_of_fold_scores(x, y, groups, seed=0)
    assert scores.shape == (60,) and np.all((scores > 0) & (scores < 1))
    again = acquisition_stats.out_of_fold_scores(x, y, groups, seed=0)
    np.testing.assert_array_equal(scores, again)
    assert scores[y == 1].mean() > scores[y == 0].mean() + 0.3


def test_balancing_weights_stop_acquisition_from_predicting_the_label():
    rng = np.random.default_rng(2)
    y = (rng.random(400) < 0.7).astype(int)
    x = rng.normal(size=(400, 3))
    x[:, 0] += 1.5 * y  # an acquisition statistic that follows the label
    groups = list(range(400))
    assert np.all(acquisition_stats.balancing_weights(x, y, groups, 0, 0.0) == 1)
    weights = acquisition_stats.balancing_weights(x, y, groups, 0, 1.0)
    for label in (0, 1):
        assert weights[y == label].mean() == pytest.approx(1.0)
    assert weights.max() <= acquisition_stats.MAX_WEIGHT * 4  # clipped, then scaled within its class

    def gap(w):
        means = [np.average(x[y == label, 0], weights=w[y == label]) for label in (0, 1)]
        return means[1] - means[0]

    assert gap(weights) < 0.5 * gap(np.ones(400))
    # the normals that look most like pneumonias weigh most
    normals = np.flatnonzero(y == 0)
    top = normals[np.argsort(x[normals, 0])[-20:]]
    assert weights[top].mean() > 2 * np.median(weights[normals])


def _disguised_dataset(root, disguised=("IM-0003", "IM-0011", "IM-0017", "IM-0020")):
    """20 NORMAL and 20 PNEUMONIA patients, 2 films each; the normals in `disguised` get films
    with a pneumonia's brightness pattern (as an acquisition that looks like the sick ones')."""
    patients = {f"IM-{i:04d}": 0 for i in range(1, 21)} | {f"person{i}": 1 for i in range(1, 21)}
    write_class_folders(root, patients, 2)
    for rank, patient in enumerate(disguised):
        for k in (1, 2):
            image = synthetic_xray(5000 + 10 * rank + k, 1)
            Image.fromarray(image).save(root / "NORMAL" / f"{patient}-000{k}.png")
    return root, set(disguised)


def test_acquisition_design_holds_out_the_pneumonia_like_normals(tmp_path):
    root, disguised = _disguised_dataset(tmp_path / "xray")
    result = load_splits(root, 0.1, 0.1, seed=3, design="acquisition")
    held_out = {s.patient for name in ("val", "internal-test") for s in result.splits[name] if s.label == 0}
    assert held_out == disguised
    counts = {name: json.dumps(info["counts"]) for name, info in result.summary()["splits"].items()}
    assert counts == {
        "train": json.dumps({"NORMAL": 32, "PNEUMONIA": 32}),
        "val": json.dumps({"NORMAL": 4, "PNEUMONIA": 4}),
        "internal-test": json.dumps({"NORMAL": 4, "PNEUMONIA": 4}),
    }
    patients = {name: {s.patient for s in members} for name, members in result.splits.items()}
    assert not patients["train"] & (patients["val"] | patients["internal-test"])
    assert result.rule["design"] == "acquisition"
    assert result.rule["acquisition"]["features"] == list(acquisition_stats.FEATURES)
    again = load_splits(root, 0.1, 0.1, seed=3, design="acquisition")
    assert {n: split_digest(m) for n, m in again.splits.items()} == {
        n: split_digest(m) for n, m in result.splits.items()
    }


def test_random_design_ignores_acquisition(tmp_path):
    root, disguised = _disguised_dataset(tmp_path / "xray")
    result = load_splits(root, 0.1, 0.1, seed=3, design="random")
    held_out = {s.patient for name in ("val", "internal-test") for s in result.splits[name] if s.label == 0}
    assert held_out != disguised and result.rule["design"] == "random"
    assert all(s.statistics is None for s in result.splits["train"])


def test_acquisition_design_carves_val_even_beside_a_given_val_folder(tmp_path):
    root = tmp_path / "kaggle"
    _disguised_dataset(root / "train")
    given = {f"IM-{i:04d}": 0 for i in range(500, 560)} | {f"person{i}": 1 for i in range(500, 560)}
    write_class_folders(root / "val", given, 1)
    result = load_splits(root, 0.1, 0.1, seed=3, design="acquisition")
    assert all(s.path.is_relative_to(root / "train") for s in result.splits["val"])
    assert "not used; the acquisition design carves its val split" in result.notes[0]


def test_unknown_design_is_refused(tmp_path):
    with pytest.raises(ValueError, match="validation design must be one of acquisition, random"):
        load_splits(tmp_path, 0.1, 0.1, seed=3, design="family")
    with pytest.raises(ValueError, match="validation design"):
        Config(val_design="family")


def test_rebuilt_from_file_lists_or_rule_and_refused_when_files_changed(tmp_path):
    root, _ = _disguised_dataset(tmp_path / "xray")
    made = load_splits(root, 0.1, 0.1, seed=3, design="acquisition")
    digests = {name: split_digest(members) for name, members in made.splits.items()}
    from_lists = rebuild_splits(root, made.rule, digests, file_lists=made.file_lists())
    by_rule = rebuild_splits(root, made.rule, digests)
    for rebuilt in (from_lists, by_rule):
        assert {n: split_digest(m) for n, m in rebuilt.splits.items()} == digests
    victim = made.splits["val"][0].path
    Image.fromarray(synthetic_xray(999, 0)).save(victim)  # other bytes, same name
    with pytest.raises(
        DataError, match=r"its val split differs .+ \(1 file\(s\) missing or changed, e\.g\. NORMAL/"
    ):
        rebuild_splits(root, made.rule, digests, file_lists=made.file_lists())
    victim.unlink()
    with pytest.raises(DataError, match=r"its val split differs .+ missing or changed"):
        rebuild_splits(root, made.rule, digests, file_lists=made.file_lists())


def test_legacy_config_without_a_design_was_random_and_unweighted():
    written = Config(val_design="acquisition", acquisition_reweight=1.0).to_dict()
    saved = dict(written)
    del saved["val_design"], saved["acquisition_reweight"]
    legacy, current = Config.from_dict(saved), Config.from_dict(written)
    assert (legacy.val_design, legacy.acquisition_reweight) == ("random", 0.0)
    assert (current.val_design, current.acquisition_reweight) == ("acquisition", 1.0)


def test_scan_keeps_statistics_only_when_asked(tmp_path):
    root, _ = _disguised_dataset(tmp_path / "xray")
    plain, measured = scan(root), scan(root, statistics=True)
    assert all(s.statistics is None for s in plain.samples)
    assert all(s.statistics.shape == (len(acquisition_stats.FEATURES),) for s in measured.samples)
