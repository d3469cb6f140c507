"""pneumoscan.evaluate, pneumoscan.report and `pneumoscan threshold`."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import SAMPLES
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


def test_other_data_cannot_rebuild_the_val_split(trained_run, tmp_path, capsys):
    root, run_dir = trained_run
    other = tmp_path / "other"
    shutil.copytree(root, other)
    next((other / "train" / "NORMAL").iterdir()).unlink()
    assert main(["evaluate", "--model", str(run_dir), "--data", str(other), "--split", "val"]) == 2
    assert "differs from the one the model was trained with" in capsys.readouterr().err


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
