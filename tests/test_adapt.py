"""pneumoscan adapt: refusals before anything is written, the cross-fitted estimate, and a bundle
that every other command reads as it is."""

import hashlib
import json

import keras
import numpy as np
import pytest

from conftest import SAMPLES, load_benchmark, write_class_folders
from pneumoscan.adapt import ADAPT_RULE, HEAD_PENALTIES, Head, choose_penalty, patient_folds
from pneumoscan.cli import main
from pneumoscan.decision import Decision

nonxray = load_benchmark("trust/nonxray")


def _site(root, per_class=12, seed=7, images=2):
    patients = {f"IM-{500 + i:04d}": 0 for i in range(per_class)}
    patients.update({f"person{900 + i}": 1 for i in range(per_class)})
    return write_class_folders(root, patients, images_per_patient=images, seed=seed)


@pytest.mark.parametrize("method", ["finetune", "recalibrate", "head"])
def test_adapt_writes_a_bundle_the_other_commands_read(trained_run, tmp_path, capsys, method):
    _, run_dir = trained_run
    site, out = _site(tmp_path / "site"), tmp_path / "adapted"
    flags = ["--site", "Ward 7", "--method", method]
    assert main(["adapt", "--model", str(run_dir), "--data", str(site), "--out", str(out), *flags]) == 0
    err = capsys.readouterr().err
    assert "Fold 5/5" in err and "before" in err and "after" in err
    meta = json.loads((out / "metadata.json").read_text())
    block = meta["adaptation"]
    parent_meta = (run_dir / "metadata.json").read_bytes()
    assert block["parent"] == {"arch": "seed", "digest": hashlib.sha256(parent_meta).hexdigest()}
    assert (block["site"], block["method"], block["rule"]) == (
        "Ward 7",
        method,
        meta["threshold"]["rule"],
    )
    assert (
        block["rule"]
        == ADAPT_RULE
        != json.loads((run_dir / "metadata.json").read_text())["threshold"]["rule"]
    )
    assert block["films"] == {"NORMAL": 24, "PNEUMONIA": 24}
    assert block["patients"] == {"NORMAL": 12, "PNEUMONIA": 12}
    assert meta["threshold"]["split"] == "site" and meta["calibration"]["fitted_on"] == "site"
    for when in ("before", "after"):
        for name in ("accuracy", "sensitivity", "specificity", "roc_auc"):
            low, high = block["estimate"][when][f"{name}_ci95"]
            assert low <= block["estimate"][when][name] <= high, (when, name)
    # recalibrate keeps the weights; head changes the output layer's alone; finetune moves them
    # all, but not far from the parent's (L2-SP).
    if method == "recalibrate":
        assert (out / "model.keras").read_bytes() == (run_dir / "model.keras").read_bytes()
    elif method == "head":
        parent, tuned = (keras.models.load_model(d / "model.keras", compile=False) for d in (run_dir, out))
        changed = [
            layer.name
            for layer, other in zip(parent.layers, tuned.layers, strict=True)
            if any(
                not np.array_equal(a, b)
                for a, b in zip(layer.get_weights(), other.get_weights(), strict=True)
            )
        ]
        assert changed == [parent.layers[-1].name]
        assert block["head"] == {"components": 16, "penalties": list(HEAD_PENALTIES), "inner_folds": 4}
    else:
        parent, tuned = (keras.models.load_model(d / "model.keras", compile=False) for d in (run_dir, out))
        before, after = (np.concatenate([w.ravel() for w in m.get_weights()]) for m in (parent, tuned))
        moved = np.linalg.norm(after - before) / np.linalg.norm(before)  # of all the weights together
        assert 0.001 < moved < 0.2, moved
    Decision.from_metadata(meta)
    # "before" is the parent model on the same films: what `evaluate` measures independently.
    assert main(["evaluate", "--model", str(run_dir), "--data", str(site), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    for name in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        assert block["estimate"]["before"][name] == pytest.approx(measured[name], abs=1e-9), name
    # predict reads the adapted bundle and names it.
    assert main(["predict", "--model", str(out), "--format", "json", str(site / "NORMAL")]) == 0
    records = json.loads(capsys.readouterr().out)
    digest = hashlib.sha256((out / "metadata.json").read_bytes()).hexdigest()
    assert len(records) == 24 and {r["model_digest"] for r in records} == {digest}
    assert {r["threshold"] for r in records} == {meta["threshold"]["value"]}


REFUSALS = [
    # name, how the site and --out are made, extra flags, words of the one sentence
    ("out exists", lambda tmp: (_site(tmp / "site"), (tmp / "out").mkdir()), [], "already exists"),
    (
        "no PNEUMONIA folder",
        lambda tmp: (_site(tmp / "site"), _drop(tmp / "site" / "PNEUMONIA")),
        [],
        "missing: PNEUMONIA",
    ),
    (
        "too few patients",
        lambda tmp: (_site(tmp / "site", per_class=8, images=3),),
        [],
        "at least 20 films and 10 patients",
    ),
    ("unknown rule", lambda tmp: (_site(tmp / "site"),), ["--rule", "median"], "not understood"),
    ("one fold", lambda tmp: (_site(tmp / "site"),), ["--folds", "1"], "at least 2"),
]


def _drop(folder):
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


@pytest.mark.parametrize("name, make, extra, words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_bad_input_is_one_sentence_and_nothing_written(
    trained_run, tmp_path, capsys, name, make, extra, words
):
    _, run_dir = trained_run
    make(tmp_path)
    out = tmp_path / "out"
    existed = out.exists()
    code = main(
        ["adapt", "--model", str(run_dir), "--data", str(tmp_path / "site"), "--out", str(out), *extra]
    )
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err, err
    assert out.exists() == existed and (not existed or not any(out.iterdir()))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no half-built bundle


def test_films_of_the_parents_own_splits_are_left_out(trained_run, tmp_path, capsys):
    """The training films' own bytes would flatter the estimate: a copy of them is left out
    (and then too few remain)."""
    root, run_dir = trained_run
    site = tmp_path / "site"
    for name in ("NORMAL", "PNEUMONIA"):
        (site / name).mkdir(parents=True)
        for path in (root / "train" / name).iterdir():
            (site / name / path.name).write_bytes(path.read_bytes())
    assert main(["adapt", "--model", str(run_dir), "--data", str(site), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "left out 60 film(s) byte-identical" in err and "0 usable film(s)" in err


@pytest.mark.parametrize("folds", [2, 5])
def test_patient_folds_keep_each_patient_whole(folds):
    groups = np.repeat(np.arange(23), [1, 2, 3] * 7 + [2, 2])
    fold_of = patient_folds(groups, folds, seed=3)
    for group in np.unique(groups):
        assert len(set(fold_of[groups == group])) == 1, group
    assert set(fold_of) == set(range(folds))
    assert np.array_equal(fold_of, patient_folds(groups, folds, seed=3))
    assert not np.array_equal(fold_of, patient_folds(groups, folds, seed=4))


def _real_site(root, copies=3):
    """A site of real X-rays: each committed sample film, cropped `copies` ways and saved as PNG
    under a patient of its own (byte-different from the films the bundled model saw)."""
    from PIL import Image

    n = 0
    for path in sorted(SAMPLES.rglob("*.jpeg")):
        image = Image.open(path).convert("L")
        folder = root / path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            inset = 4 + 6 * k
            crop = image.crop((inset, inset, image.width - inset, image.height - inset))
            name = (
                f"IM-{7000 + n:04d}-0001.png"
                if path.parent.name == "NORMAL"
                else f"person{7000 + n}_virus_1.png"
            )
            crop.save(folder / name)
            n += 1
    return root


def test_a_fine_tuned_bundle_is_exported_as_its_parent_was(tmp_path, capsys):
    """The bundled model ships float16-rounded weights in Keras and TF.js: the fine-tuned bundle
    carries its new weights rounded the same way (before the decision is fitted), in the parent's
    formats, with an export block that describes them, not the parent's. It keeps the parent's
    out-of-distribution block, and with the new weights it still flags images that are not
    X-rays."""
    from pneumoscan.bundle import Bundle, bundled_dir
    from pneumoscan.predict import predict_files

    parent_meta = json.loads((bundled_dir() / "metadata.json").read_text())
    parent = parent_meta["export"]
    out, site = tmp_path / "adapted", _real_site(tmp_path / "site")
    assert main(["adapt", "--data", str(site), "--out", str(out), "--folds", "2"]) == 0
    capsys.readouterr()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["ood"] == parent_meta["ood"]
    adapted = Bundle.load(out)
    written = nonxray.write_set(tmp_path / "nonxray", 4, seed=11)
    records = predict_files(adapted, [path for paths in written.values() for path in paths])
    assert sum(r["ood"] for r in records) >= 0.9 * len(records) == 18
    export = meta["export"]
    assert (export["quantize"], export["formats"]) == (parent["quantize"], parent["formats"])
    assert export["source"].endswith(", adapted") and export["tfjs_bytes"] > 0
    tuned = keras.models.load_model(out / "model.keras", compile=False).get_weights()
    shipped = keras.models.load_model(bundled_dir() / "model.keras", compile=False).get_weights()
    assert all(np.array_equal(w, w.astype(np.float16).astype(np.float32)) for w in tuned)
    assert any(not np.array_equal(a, b) for a, b in zip(tuned, shipped, strict=True))


@pytest.mark.parametrize("folds", [2, 5])
def test_stratified_patient_folds_deal_each_class_evenly(folds):
    """Class-stratified: each fold holds, of each class, the same number of patients give or take
    one, while every patient stays whole."""
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(40), rng.integers(1, 4, 40))
    labels = (groups >= 29).astype(int)  # 29 patients of one class, 11 of the other
    fold_of = patient_folds(groups, folds, seed=3, labels=labels)
    for group in np.unique(groups):
        assert len(set(fold_of[groups == group])) == 1, group
    for c in (0, 1):
        patients = [len(set(groups[(fold_of == k) & (labels == c)])) for k in range(folds)]
        assert max(patients) - min(patients) <= 1, (c, patients)
    assert not np.array_equal(fold_of, patient_folds(groups, folds, seed=4, labels=labels))


def _bn_weights(model):
    return [
        w.numpy().copy()
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
        for w in layer.weights
    ]


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_finetune_keeps_batch_norm_in_inference_mode_when_asked(freeze_bn):
    """Frozen: the batch-norm layers' moving statistics, scale and offset stay the parent's while
    the convolutions move; updated: they move too."""
    from pneumoscan.adapt import finetune
    from pneumoscan.bundle import Bundle

    bundle = Bundle.load(None)
    size = bundle.image_size
    x = np.random.default_rng(0).uniform(0, 255, (8, size, size, 1)).astype(np.float32)
    labels = np.array([0, 1] * 4)
    tuned = finetune(bundle, x, labels, 0, lambda _: None, epochs=1, freeze_bn=freeze_bn)
    kept = [np.array_equal(a, b) for a, b in zip(_bn_weights(bundle.model), _bn_weights(tuned), strict=True)]
    assert kept and (all(kept) if freeze_bn else not any(kept))
    assert not np.array_equal(bundle.model.get_weights()[0], tuned.get_weights()[0])


def test_replay_films_are_drawn_half_of_each_class(tmp_path):
    from pneumoscan.adapt import _replay_draw, load_replay
    from pneumoscan.bundle import Bundle

    labels = np.array([0] * 30 + [1] * 90)
    picked = _replay_draw(labels, 40, np.random.default_rng(1))
    assert len(set(picked.tolist())) == 40 and labels[picked].sum() == 20
    assert labels[_replay_draw(labels, 100, np.random.default_rng(1))].tolist().count(0) == 30  # all it has
    root = _site(tmp_path / "data" / "train", per_class=6)  # a data root whose train/ holds them
    x, y = load_replay(Bundle.load(None), tmp_path / "data", lambda _: None)
    assert x.shape == (24, 160, 160, 1) and y.tolist().count(1) == 12 and root.is_dir()


def test_replay_mixes_training_films_into_the_fine_tune(trained_run, tmp_path, capsys):
    root, run_dir = trained_run
    out = tmp_path / "adapted"
    site = _site(tmp_path / "site", seed=23)
    assert main(["adapt", "--model", str(run_dir), "--data", str(site), "--out", str(out), "--folds", "2",
                 "--replay", str(root)]) == 0  # fmt: skip
    assert "Replay: 60 films" in capsys.readouterr().err
    block = json.loads((out / "metadata.json").read_text())["adaptation"]
    assert block["replay"] == {"folder": str(root), "films": 60}
    code = main(["adapt", "--model", str(run_dir), "--data", str(site), "--out", str(tmp_path / "o2"),
                 "--method", "recalibrate", "--replay", str(root)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "needs --method finetune" in err and not (tmp_path / "o2").exists()


def test_epochs_are_chosen_by_the_inner_folds_auc_ties_to_fewer(trained_run, tmp_path, monkeypatch):
    """choose_epochs fine-tunes once to the largest choice, scores the held-out inner fold after
    each choice, and takes the best AUC, the fewest epochs among equals."""
    from pneumoscan import adapt
    from pneumoscan.bundle import Bundle
    from pneumoscan.data import group_ids, inputs, scan

    _, run_dir = trained_run
    bundle = Bundle.load(run_dir)
    samples = scan(_site(tmp_path / "site", seed=31), bundle.image_size).samples
    labels, groups = np.array([s.label for s in samples]), np.array(group_ids(samples))
    aucs = iter([0.90, 0.95, 0.95])
    monkeypatch.setattr(adapt, "EPOCH_CHOICES", (1, 2, 3))
    monkeypatch.setattr(adapt.metrics, "roc_auc", lambda y, p: next(aucs))
    assert adapt.choose_epochs(bundle, inputs(samples), labels, groups, seed=0) == 2
    assert next(aucs, None) is None  # scored after each of the three choices


def _features(seed=0, n=120, d=24, copies=3, informative=True):
    """(features (copies, n, d), parent kernel, bias, labels, groups): the parent's kernel reads
    dimension 0, which carries half the signal; dimension 1 carries the rest (or nothing)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    base = rng.normal(size=(n, d))
    base[:, 0] += 0.5 * (2 * labels - 1)
    if informative:
        base[:, 1] += 1.5 * (2 * labels - 1)
    features = base + 0.05 * rng.normal(size=(copies, n, d))
    kernel = np.zeros(d)
    kernel[0] = 1.0
    groups = np.arange(n) // 2  # two films a patient
    return features, kernel, 0.0, labels, groups


def _auc(labels, scores):
    positive, negative = scores[labels == 1], scores[labels == 0]
    return float((positive[:, None] > negative[None, :]).mean())


@pytest.mark.parametrize(
    ("penalty", "informative", "gains"),
    [(1e-3, True, True), (1e6, True, False), (1e-3, False, False)],
    ids=["light penalty, a second signal", "huge penalty: the parent's logit only", "no second signal"],
)
def test_head_refits_the_output_layer_as_one_kernel_and_bias(penalty, informative, gains):
    features, kernel, bias, labels, _ = _features(informative=informative)
    head = Head(8, penalty).fit(features, kernel, bias, labels)
    a, b = head.params[:2]
    # Its kernel and bias are the fitted regression exactly: a * parent logit + b + components.
    logits = features @ head.kernel + head.bias
    regression = a * (features @ kernel + bias) + b + ((features - head.mean) @ head.basis) @ head.params[2:]
    np.testing.assert_allclose(logits, regression, atol=1e-9)
    np.testing.assert_allclose(head.raw(features), (1 / (1 + np.exp(-logits))).mean(0))
    if penalty >= 1e6:  # every component's coefficient ~0: the parent's kernel, rescaled
        np.testing.assert_allclose(head.kernel, a * kernel, atol=1e-4)
    before, after = _auc(labels, features[0] @ kernel), _auc(labels, head.raw(features))
    assert (after > before + 0.05) == gains, (before, after)


@pytest.mark.parametrize(("informative", "expected"), [(True, "small"), (False, "large")])
def test_the_penalty_is_chosen_by_inner_patient_folds(informative, expected):
    """With a second signal the inner folds keep a light penalty; with none, a heavy one."""
    features, kernel, bias, labels, groups = _features(informative=informative, n=160)
    penalty = choose_penalty(features, kernel, bias, labels, groups, seed=0)
    assert penalty in HEAD_PENALTIES
    assert (penalty <= 0.1) == (expected == "small"), penalty
