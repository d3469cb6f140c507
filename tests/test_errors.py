"""pneumoscan.errors: one home for every error class, each carrying its exit code."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

from pneumoscan import cli, errors

PACKAGE = Path(errors.__file__).parent
CLASSES = [
    value
    for value in vars(errors).values()
    if inspect.isclass(value)
    and issubclass(value, errors.PneumoscanError)
    and value is not errors.PneumoscanError
]
# Where each error was defined before errors.py held them all: those imports must keep working.
OLD_HOMES = {
    "UsageError": "cli",
    "DataError": "data",
    "ImageError": "preprocess",
    "DicomError": "dicom",
    "MetadataError": "metadata",
    "ModelNotFound": "bundle",
    "ExportError": "export",
    "ServeError": "serve",
    "StrategyError": "strategy",
    "RunConflict": "train",
    "WorkerLost": "train",
}
# The errors added since, defined in errors.py only.
NEW = ["MissingExtra"]
# The exit codes the CLI gave before (usage 2, failure 1): a contract of the command.
EXIT_CODES = {
    "UsageError": 2,
    "DataError": 2,
    "ModelNotFound": 2,
    "ExportError": 2,
    "ServeError": 2,
    "StrategyError": 2,
    "RunConflict": 2,
    "ImageError": 1,
    "DicomError": 1,
    "MetadataError": 1,
    "WorkerLost": 1,
    "MissingExtra": 1,
}


def test_every_error_of_the_package_is_defined_in_errors_py():
    elsewhere = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(base, ast.Name) and re.search(r"(Error|Exception)$", base.id)
                for base in node.bases
            ):
                elsewhere.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert elsewhere == []
    assert sorted(cls.__name__ for cls in CLASSES) == sorted([*OLD_HOMES, *NEW])


@pytest.mark.parametrize("name", sorted(OLD_HOMES))
def test_old_imports_give_the_same_class(name):
    module = importlib.import_module(f"pneumoscan.{OLD_HOMES[name]}")
    assert getattr(module, name) is getattr(errors, name)


@pytest.mark.parametrize("name", sorted(EXIT_CODES))
def test_the_cli_exit_code_is_the_class_attribute(name, monkeypatch):
    cls = getattr(errors, name)
    assert cls.exit_code == EXIT_CODES[name]
    # The code must not depend on which modules happen to be imported (it once looked
    # RunConflict and WorkerLost up in sys.modules["pneumoscan.train"]).
    monkeypatch.delitem(sys.modules, "pneumoscan.train", raising=False)
    assert cli._error_code(cls("one sentence.")) == EXIT_CODES[name]


def test_a_bug_and_an_os_error_keep_their_codes():
    assert cli._error_code(KeyError("x")) is None
    assert cli._error_code(ValueError("x")) is None
    assert cli._error_code(FileNotFoundError("x")) == 1


def test_errors_that_were_value_errors_still_are():
    # Callers catch ValueError around config parsing and file reading.
    for cls in CLASSES:
        if cls.__name__ in OLD_HOMES and cls not in (errors.UsageError, errors.WorkerLost):
            assert issubclass(cls, ValueError), cls
    assert issubclass(errors.WorkerLost, RuntimeError)


def test_only_worker_lost_exits_at_once(monkeypatch, capsys):
    assert [cls.__name__ for cls in CLASSES if cls.exits_at_once] == ["WorkerLost"]

    def lose(args):
        raise errors.WorkerLost("another worker of the cluster stopped.")

    monkeypatch.setattr(cli, "_serve", lose)  # `demo` runs it
    monkeypatch.setattr(cli, "_exit_now", [None])
    assert cli.main(["demo"]) == 1
    assert cli._exit_now == [1]
    assert capsys.readouterr().err == "pneumoscan: error: another worker of the cluster stopped.\n"


def test_the_page_errors_have_python_twins_of_the_same_name():
    page = (PACKAGE / "web" / "errors.js").read_text()
    names = re.findall(r"export class (\w+) extends Error", page)
    assert names and all(hasattr(errors, name) for name in names)


@pytest.mark.parametrize(
    ("module", "package"),
    [
        ("tensorflow", "TensorFlow"),
        ("tensorflow.python.framework", "TensorFlow"),
        ("keras", "Keras"),
        ("matplotlib.pyplot", "matplotlib"),
        ("absl", "TensorFlow"),
        ("h5py", "h5py"),
        ("tensorboard", "TensorBoard"),
    ],
)
def test_a_missing_training_package_is_one_sentence_naming_the_extra(module, package, monkeypatch, capsys):
    def handler(args):
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    monkeypatch.setattr(cli, "_serve", handler)  # `demo` runs it
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err == (
        f"pneumoscan: error: pneumoscan demo needs {package}, which this installation lacks; install "
        "the training dependencies with pip install 'pneumoscan[train]' (or make test in a checkout).\n"
    )


@pytest.mark.parametrize(
    "error",
    [
        ModuleNotFoundError("No module named 'yaml'", name="yaml"),
        ModuleNotFoundError("No module named 'tensorflowjs'", name="tensorflowjs"),
        ModuleNotFoundError("no name"),
        ImportError("cannot import name 'x' from 'keras'", name="keras"),
        ValueError("tensorflow"),
    ],
)
def test_other_errors_are_not_a_missing_extra(error):
    assert errors.MissingExtra.of(error, "train") is None
