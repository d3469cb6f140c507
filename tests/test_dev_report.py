"""benchmarks/robustness/dev_report.py: families by file name, recipes by run name, and paired scoring of
models on one set of films."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SAMPLES, keras_predict, load_benchmark

dev_report = load_benchmark("robustness/dev_report")


@pytest.mark.parametrize(
    "file_name, family",
    [
        ("IM-0115-0001.jpeg", "IM"),
        ("NORMAL2-IM-0383-0001.jpeg", "NORMAL2-IM"),
        ("person1006_bacteria_2937.jpeg", "bacterial"),
        ("person409_virus_816.jpeg", "viral"),
        ("scan.png", "other"),
    ],
)
def test_family_of_a_film_by_its_name(file_name, family):
    assert dev_report.family(file_name) == family


@pytest.mark.parametrize(
    "name, recipe",
    [("zoom-in-s7", ("zoom-in", 7)), ("a-s1-s1337", ("a-s1", 1337)), ("bundled", ("bundled", None))],
)
def test_recipe_and_seed_of_a_run_name(name, recipe):
    assert dev_report.recipe_of(name) == recipe


def test_settings_change_the_default_configuration_where_they_say():
    config = dev_report.configured(
        7,
        [dev_report.parse_setting(s) for s in ("augment.zoom_in=3.5", "mixup=0.2", "val_design=acquisition")],
    )
    assert (config.random_seed, config.augment.zoom_in, config.mixup, config.val_design) == (
        7,
        3.5,
        0.2,
        "acquisition",
    )
    with pytest.raises(SystemExit, match=r"only augment\.FIELD and model\.FIELD"):
        dev_report.configured(7, [("schedule.warmup", 1)])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:npv is undefined")  # a two-epoch model calls every film sick
def test_scores_are_paired_per_family_and_match_the_model(trained_run):
    from pneumoscan.bundle import Bundle
    from pneumoscan.data import inputs, scan
    from pneumoscan.metrics import roc_auc, specificity

    root, run_dir = trained_run
    models = [("one-s1", run_dir), ("two-s1", run_dir)]
    ensembles = [dev_report.parse_ensemble("both=one-s1,two-s1")]
    table = dev_report.score(
        SAMPLES, models, root, ["youden"], baseline="one", single=True, ensembles=ensembles
    )
    assert table["n"] == {"IM": 5, "NORMAL2-IM": 3, "bacterial": 5, "viral": 3}
    # The figures are the model's own on these films.
    bundle = Bundle.load(run_dir)
    samples = scan(SAMPLES, bundle.image_size).samples
    labels = np.array([s.label for s in samples])
    probs = bundle.probabilities(inputs(samples))
    shipped = table["models"]["one-s1"]["shipped"]
    assert shipped["roc_auc"][0] == pytest.approx(roc_auc(labels, probs))
    normal2 = np.array([s.path.name.startswith("NORMAL2") for s in samples])
    keep = normal2 | (labels == 1)
    assert shipped["NORMAL2-IM specificity"][0] == pytest.approx(
        specificity(labels[keep], (probs[keep] >= bundle.threshold).astype(int))
    )
    assert shipped["roc_auc"][1] <= shipped["roc_auc"][0] <= shipped["roc_auc"][2]
    assert "youden" in table["models"]["one-s1"]  # refitted on the run's own val
    # The same model twice: every paired difference is exactly zero, interval included.
    difference = table["differences"]["two - one"]["shipped"]
    for figure in ("roc_auc", "accuracy", "IM specificity", "viral sensitivity"):
        assert difference[figure]["mean"] == 0.0 and difference[figure]["ci95"] == [0.0, 0.0]
    assert "| one-s1 | shipped |" in dev_report.markdown(table)
    # Without the copies: the film's own output, ranked as Keras ranks it.
    assert bundle.metadata["test_time"] and "one+single" in table["recipes"]
    alone = keras_predict(bundle.model, inputs(samples)).reshape(-1)
    assert table["models"]["one+single-s1"]["shipped"]["roc_auc"][0] == pytest.approx(roc_auc(labels, alone))
    # A model averaged with itself is the model, refitted by today's default rule on its val.
    both, one = table["models"]["both"], table["models"]["one-s1"]
    assert both["path"] == "one-s1 + two-s1" and both["shipped"]["roc_auc"] == one["shipped"]["roc_auc"]
    assert both["youden"]["threshold"] == pytest.approx(one["youden"]["threshold"])


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("pair=a-s1,b+single-s1", ("pair", ("a-s1", "b+single-s1"))),
        ("a-s1,b-s1", ("a-s1,b-s1", ("a-s1", "b-s1"))),
    ],
)
def test_an_ensemble_is_named_and_has_two_members_or_more(text, parsed):
    assert dev_report.parse_ensemble(text) == parsed
    with pytest.raises(SystemExit, match="write NAME=A"):
        dev_report.parse_ensemble("lonely=a-s1")
