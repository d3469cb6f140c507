"""pneumoscan.evaluate, pneumoscan.report and `pneumoscan threshold`."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import AWKWARD_BAD, AWKWARD_VALID, SAMPLES, write_awkward, write_class_folders
from pneumoscan.cli import main
from pneumoscan.metadata import read

TOP_KEYS = [
    "n",
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "balanced_accuracy",
    "roc_auc",
    "pr_auc",
    "brier",
    "ece",
    "threshold",
    "confusion_matrix",
    "ci95",
    "at_0_5",
]
CI_KEYS = [
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "npv",
    "f1",
    "balanced_accuracy",
    "roc_auc",
    "pr_auc",
]


@pytest.mark.parametrize("split", ["val", "internal-test"])
def test_json_has_exactly_the_contract_keys(trained_run, split, capsys):
    root, run_dir = trained_run
    assert main(["evaluate", "--model", str(run_dir), "--data", str(root), "--split", split, "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert out.count("\n") == 1
    assert list(result) == TOP_KEYS
    assert list(result["ci95"]) == CI_KEYS
    assert set(result["at_0_5"]) == set(TOP_KEYS) - {"ci95", "at_0_5", "threshold"}
    counts = read(run_dir)["data"]["splits"][split]["counts"]
    assert result["n"] == sum(counts.values()) == sum(result["confusion_matrix"].values())
    assert result["threshold"] == read(run_dir)["threshold"]["value"]
    for name, (lo, hi) in result["ci95"].items():
        if result[name] is not None and lo is not None:
            assert lo <= result[name] + 1e-9 and result[name] <= hi + 1e-9


def test_missing_test_split_exits_2_naming_the_path(trained_run, capsys):
    root, run_dir = trained_run
    assert main(["evaluate", "--model", str(run_dir), "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'test'}: no such folder" in err and "Traceback" not in err


def test_training_files_are_flagged(trained_run, capsys):
    root, run_dir = trained_run
    assert main(["evaluate", "--model", str(run_dir), "--data", str(root), "--split", "train", "--json"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: (\d+) of the \1 evaluated files were in the model's training split", err)


@pytest.mark.parametrize(
    ("keep_splits_json", "sentence"),
    [
        # The split named is the one the removed file was in (train, val or internal-test).
        (True, r"its [\w-]+ split differs from the one .+ \(1 file\(s\) missing or changed, e\.g\. NORMAL/"),
        (False, r"its [\w-]+ split differs from the one the model was trained with"),
    ],
)
def test_other_data_cannot_rebuild_the_val_split(trained_run, tmp_path, capsys, keep_splits_json, sentence):
    root, run_dir = trained_run
    other, model = tmp_path / "other", tmp_path / "model"
    shutil.copytree(root, other)
    shutil.copytree(run_dir, model)
    if not keep_splits_json:  # rebuilt by the rule in metadata.json
        (model / "splits.json").unlink()
    next((other / "train" / "NORMAL").iterdir()).unlink()
    assert main(["evaluate", "--model", str(model), "--data", str(other), "--split", "val"]) == 2
    assert re.search(sentence, capsys.readouterr().err)


def test_report_folder(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(run_dir), "--data", str(SAMPLES), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {
        "metrics.json",
        "roc.png",
        "pr.png",
        "confusion_matrix.png",
        "reliability.png",
        "training_curves.png",
        "errors.png",
        "report.html",
    } - ({"errors.png"} - names)
    page = (out / "report.html").read_text()
    sources = re.findall(r'src=["\']([^"\']+)', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 16 and metrics["context"]["model"] == str(run_dir)
    assert "16 images" in capsys.readouterr().out


def test_threshold_command_rewrites_metadata(trained_run, tmp_path, capsys):
    root, run_dir = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["threshold", "--model", str(copy), "--data", str(root), "--rule", "fixed:0.3"]) == 0
    meta = read(copy)
    assert meta["threshold"] == {
        "value": 0.3,
        "rule": "fixed:0.3",
        "split": None,
        "applies_to": "calibrated probability",
    }
    assert main(["threshold", "--model", str(copy), "--data", str(root), "--rule", "sensitivity:1.0"]) == 0
    meta = read(copy)
    assert meta["threshold"]["rule"] == "sensitivity:1.0" and meta["threshold"]["split"] == "val"
    assert meta["metrics"]["val"]["sensitivity"] == 1.0
    assert meta["calibration"]["fitted_on"] == "val"
    capsys.readouterr()
    assert main(["threshold", "--model", str(copy), "--data", str(root), "--rule", "best"]) == 2
    assert "best" in capsys.readouterr().err


@pytest.fixture(scope="module")
def single_folder_run(tmp_path_factory) -> tuple[Path, Path]:
    """(a {NORMAL,PNEUMONIA} folder of 48 images, a 1-epoch run trained on it)."""
    from pneumoscan.config import Config
    from pneumoscan.train import train

    root = tmp_path_factory.mktemp("single")
    patients = {f"IM-{100 + i:04d}": 0 for i in range(12)} | {f"person{i + 1}": 1 for i in range(12)}
    data = write_class_folders(root / "xray", patients)
    run_dir = root / "run"
    train(
        Config(arch="seed", image_size=64, epochs=1, batch_size=8, random_seed=1),
        data,
        run_dir,
        log=lambda _: None,
    )
    return data, run_dir


def _evaluate_json(run_dir: Path, data: Path, *flags: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["evaluate", "--model", str(run_dir), "--data", str(data), "--json", *flags]) == 0
    return json.loads(out.getvalue())


@pytest.mark.parametrize("split", ["val", "internal-test", "train"])
def test_splits_of_a_single_folder_run_come_from_its_splits(single_folder_run, split):
    data, run_dir = single_folder_run
    counts = read(run_dir)["data"]["splits"][split]["counts"]
    assert _evaluate_json(run_dir, data, "--split", split)["n"] == sum(counts.values()) < 48


def test_test_split_of_a_class_folder_scores_every_file(single_folder_run, capsys):
    data, run_dir = single_folder_run
    result = _evaluate_json(run_dir, data)  # --split test, the default: an external test set
    assert result["n"] == 48 and list(result) == TOP_KEYS
    assert "were in the model's training split" in capsys.readouterr().err  # it is the run's own folder


def test_a_folder_without_the_runs_split_is_a_clear_error(single_folder_run, tmp_path, capsys):
    _, run_dir = single_folder_run
    other = write_class_folders(tmp_path / "other", {"IM-0001": 0, "person1": 1, "person2": 1})
    assert main(["evaluate", "--model", str(run_dir), "--data", str(other), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "differs from the one the model was trained with" in err and "Traceback" not in err


def test_threshold_on_a_single_folder_run_is_fitted_on_val_only(single_folder_run, tmp_path):
    data, run_dir = single_folder_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["threshold", "--model", str(copy), "--data", str(data), "--rule", "youden"]) == 0
    meta = read(copy)
    assert meta["threshold"]["split"] == "val" and meta["calibration"]["fitted_on"] == "val"
    assert meta["metrics"]["val"]["n"] == sum(meta["data"]["splits"]["val"]["counts"].values())


def test_val_split_warns_that_it_chose_the_model(single_folder_run, capsys):
    data, run_dir = single_folder_run
    _evaluate_json(run_dir, data, "--split", "val")
    err = capsys.readouterr().err
    assert "the best epoch, calibration and threshold of this model were chosen on this val split" in err
    _evaluate_json(run_dir, data, "--split", "internal-test")
    assert "chosen on this val split" not in capsys.readouterr().err


def test_external_files_with_the_bytes_of_a_split_are_flagged_and_scored(single_folder_run, tmp_path, capsys):
    data, run_dir = single_folder_run
    external = tmp_path / "external"
    val = json.loads((run_dir / "splits.json").read_text())["splits"]["val"]
    for relpath, _ in val[:2]:
        (external / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / relpath, external / relpath.replace("IM-", "EXT-IM-").replace("person", "ext"))
    write_class_folders(external, {"IM-0900": 0, "person900": 1}, 1, seed=10**6)
    result = _evaluate_json(run_dir, external)
    err = capsys.readouterr().err
    n = result["n"]
    assert n == len(list(external.rglob("*.png")))
    assert f"warning: 2 of the {n} evaluated files have the bytes of files of the model's val split" in err


def test_bootstrap_resamples_the_groups_the_splits_keep(single_folder_run, tmp_path, monkeypatch):
    """Two files of different patients with identical bytes are one group, as in the splits."""
    from pneumoscan import evaluate as evaluate_module

    data, run_dir = single_folder_run
    folder = tmp_path / "dup"
    shutil.copytree(data, folder)
    shutil.copy(folder / "PNEUMONIA" / "person1_bacteria0.png", folder / "PNEUMONIA" / "person99_virus_1.png")
    seen = {}

    def spy(labels, probabilities, threshold, groups, n_resamples):
        seen["groups"] = groups
        return {}

    monkeypatch.setattr(evaluate_module, "bootstrap_ci", spy)
    evaluation = evaluate_module.evaluate(run_dir, folder, n_resamples=10)
    names = [Path(s.relpath).name for s in evaluation.samples]
    groups = dict(zip(names, seen["groups"], strict=True))
    assert (
        groups["person1_bacteria0.png"] == groups["person99_virus_1.png"] == groups["person1_bacteria1.png"]
    )
    assert len(set(seen["groups"])) == 24  # one per patient: the copy joins person1's


def test_the_awkward_corpus_in_an_external_folder(single_folder_run, tmp_path, capsys):
    _, run_dir = single_folder_run
    external = write_class_folders(tmp_path / "external", {"IM-0900": 0, "person900": 1}, 1, seed=10**6)
    write_awkward(external / "PNEUMONIA" / "odd")
    result = _evaluate_json(run_dir, external, "--out", str(tmp_path / "report"))
    bad = sum(Path(name).suffix != ".gif" for name in AWKWARD_BAD)
    assert "unreadable" in (tmp_path / "report" / "report.html").read_text()
    assert result["n"] == 2 + len(AWKWARD_VALID)
    err = capsys.readouterr().err
    assert f"skipped {bad} unreadable file(s)" in err and "Traceback" not in err


def test_intervals_hold_at_small_counts_and_the_training_warning_comes_first(trained_run, tmp_path, capsys):
    """Issue 23: every proportion's interval takes in its Wilson interval from the confusion
    matrix (never a point at these counts), the table and the report give n beside each, and the
    report opens with the warning that the films were in the training split."""
    from pneumoscan.metrics import PROPORTIONS, wilson_interval

    root, run_dir = trained_run
    out = tmp_path / "report"
    command = ["evaluate", "--model", str(run_dir), "--data", str(root), "--split", "train"]
    assert main([*command, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    cm = result["confusion_matrix"]
    for name, (hits, cases) in PROPORTIONS.items():
        total = sum(cm[c] for c in cases)
        if total == 0:
            continue
        low, high = wilson_interval(sum(cm[c] for c in hits), total)
        lo, hi = result["ci95"][name]
        assert lo <= low + 1e-12 and hi >= high - 1e-12 and lo < hi, (name, result["ci95"][name], low, high)
    assert main([*command, "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:5] == ["metric", "value", "95%", "CI", "n"]
    sensitivity = next(line for line in table if line.startswith("sensitivity"))
    assert sensitivity.split()[-2] == str(cm["tp"] + cm["fn"])
    assert any(line.startswith("95% CI: a bootstrap over patients") and "Wilson" in line for line in table)
    page = (out / "report.html").read_text()
    warning = page.index("were in the model&#x27;s training split")
    assert warning < page.index("<h2>Metrics</h2>")
    assert "<th>n</th>" in page and "Films to look at" in page
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["intervals"]["n"]["sensitivity"] == cm["tp"] + cm["fn"]
    digest = hashlib.sha256((run_dir / "metadata.json").read_bytes()).hexdigest()
    assert metrics["context"]["model_digest"] == digest and digest[:16] in page


def test_the_report_lists_flagged_wrong_and_borderline_films_with_thumbnails(tmp_path, capsys):
    """The bundled model on two samples of each class and a photograph filed as NORMAL: the
    report's list puts the photograph first as flagged, then the errors and borderline films,
    each with its thumbnail."""
    from PIL import Image

    from conftest import load_benchmark

    nonxray = load_benchmark("trust/nonxray")
    data = tmp_path / "data"
    for label, names in {
        "NORMAL": ["IM-0115-0001.jpeg", "IM-0393-0001.jpeg"],
        "PNEUMONIA": ["person391_bacteria_1782.jpeg", "person19_bacteria_61.jpeg"],
    }.items():
        (data / label).mkdir(parents=True)
        for name in names:
            shutil.copyfile(SAMPLES / label / name, data / label / name)
    Image.fromarray(nonxray.generate(nonxray.KINDS[0], 0)).save(data / "NORMAL" / "photo.png")
    out = tmp_path / "report"
    assert main(["evaluate", "--data", str(data), "--out", str(out)]) == 0
    capsys.readouterr()
    page = (out / "report.html").read_text()
    listed = page[page.index("<h2>Films to look at</h2>") : page.index("<h2>Notes</h2>")]
    rows = re.findall(
        r"<tr><td>(.*?)</td><td>(.*?)</td><td>(\w+)</td><td>([\d.]+)</td><td>(.*?)</td></tr>", listed
    )
    assert rows[0][1] == "NORMAL/photo.png" and rows[0][4] == "flagged: not a chest X-ray?", rows
    whys = {(file, why) for _, file, _, _, why in rows}
    # person391 (p 0.41) is a false negative and borderline; IM-0393 (p 0.51) borderline only.
    assert ("PNEUMONIA/person391_bacteria_1782.jpeg", "false negative") in whys
    assert ("NORMAL/IM-0393-0001.jpeg", "borderline") in whys
    assert all(thumbnail.startswith("<img") for thumbnail, *_ in rows)
