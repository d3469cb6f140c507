"""The package's import graph: no cycles, also through imports inside functions, and the light
commands stay light (no TensorFlow just to read metadata or parse a command line)."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "src" / "pneumoscan"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pneumoscan":
                found |= {alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").is_file()}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pneumoscan."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pneumoscan.")}
        graph[path.stem] = found - {path.stem}
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


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert {"config", "model", "bundle", "data", "train", "evaluate", "predict"} <= set(graph)
    assert find_cycle(graph) is None


def test_config_and_the_cli_parser_import_no_tensorflow():
    code = (
        "import sys; import pneumoscan.cli, pneumoscan.config, pneumoscan.bundle; "
        "pneumoscan.cli.build_parser(); print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_command_does_without_scikit_learn():
    """Keras imports scikit-learn (a test dependency here) whenever it can; the command's own
    process never needs it, and loads a model and predicts without it."""
    from conftest import SAMPLES

    image = str(next(SAMPLES.rglob("*.jpeg")))
    done = subprocess.run(
        # --debug: without it, TensorFlow's import (and the import-time lines of Keras inside
        # it) writes to /dev/null (cli.import_tensorflow_quietly).
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "pneumoscan",
            "--debug",
            "predict",
            "--format",
            "csv",
            image,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    # Keras still asks for it (a line of `sklearn`, a few microseconds, refused), loads none of it.
    assert "keras.src.wrappers" in done.stderr and "sklearn." not in done.stderr
    assert done.stdout.count("\n") == 2 and image in done.stdout
