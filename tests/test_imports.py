"""The package's import graph: no cycles, also through imports inside functions, and the light
commands stay light (no TensorFlow just to read metadata or parse a command line)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "pneumoscan"


def module_name(path) -> str:
    """`training/run.py` -> "training.run"; a package's `__init__.py` -> its name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body, subpackages included
    ("training.run"); importing a module of a subpackage imports the subpackage too."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py") if module_name(path)}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pneumoscan"):
                base = node.module.removeprefix("pneumoscan").removeprefix(".")
                found |= {base} if base else set()
                found |= {f"{base}.{a.name}".lstrip(".") for a in node.names} & set(modules)
            elif isinstance(node, ast.Import):
                found |= {
                    a.name.removeprefix("pneumoscan.") for a in node.names if a.name.startswith("pneumoscan.")
                }
        parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
        graph[name] = (found | parents) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for dependency in sorted(graph.get(node, ())):
            if state.get(dependency) == "open":
                return [*path[path.index(dependency) :], dependency]
            if dependency not in state and (cycle := visit(dependency)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_walks_subpackages(tmp_path, monkeypatch):
    (tmp_path / "wing").mkdir()
    (tmp_path / "wing" / "__init__.py").write_text("")
    (tmp_path / "wing" / "a.py").write_text("from pneumoscan.wing import b\nfrom pneumoscan.top import x\n")
    (tmp_path / "wing" / "b.py").write_text("import pneumoscan.wing.a\n")
    (tmp_path / "top.py").write_text("from pneumoscan import wing\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    graph = import_graph()
    assert graph == {
        "wing": set(),
        "wing.a": {"wing", "wing.b", "top"},
        "wing.b": {"wing", "wing.a"},
        "top": {"wing"},
    }
    assert find_cycle(graph) == ["wing.a", "wing.b", "wing.a"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert {"config", "model", "bundle", "data", "train", "evaluate", "predict"} <= set(graph)
    assert {"training", "training.run", "training.fit", "training.loop"} <= set(graph)
    assert "training.checkpoint" in graph["training.run"] and "training" in graph["train"]
    assert find_cycle(graph) is None


def test_config_and_the_cli_parser_import_no_tensorflow():
    code = (
        "import sys; import pneumoscan.cli, pneumoscan.config, pneumoscan.bundle; "
        "pneumoscan.cli.build_parser(); print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("runtime", ["keras", "litert"])
def test_a_command_does_without_scikit_learn(runtime, tmp_path):
    """Keras imports scikit-learn (a test dependency here) whenever it can; the command's own
    process never needs it, and loads a model and predicts without it: on Keras (a bundle
    without its LiteRT flatbuffer), and on LiteRT (the bundled model), which imports no Keras."""
    from conftest import SAMPLES
    from pneumoscan.bundle import bundled_dir

    image = str(next(SAMPLES.rglob("*.jpeg")))
    model = bundled_dir()
    if runtime == "keras":
        model = Path(shutil.copytree(model, tmp_path / "bundle"))
        (model / "model.tflite").unlink()
    done = subprocess.run(
        # --debug: without it, TensorFlow's import (and the import-time lines of Keras inside
        # it) writes to /dev/null (forward.import_tensorflow).
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "pneumoscan",
            "--debug",
            "predict",
            "--model",
            str(model),
            "--format",
            "csv",
            image,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    if runtime == "keras":
        # Keras still asks for it (a line of `sklearn`, a few microseconds, refused), loads none of it.
        assert "keras.src.wrappers" in done.stderr and "sklearn." not in done.stderr
    else:
        imported = set(re.findall(r"^import time:.*\|\s+([\w.]+)$", done.stderr, re.M))
        assert "ai_edge_litert" in imported and "numpy" in imported  # the lines were read
        assert not {"keras", "tensorflow"} & imported and not any("sklearn" in m for m in imported)
    assert done.stdout.count("\n") == 2 and image in done.stdout
