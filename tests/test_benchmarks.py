"""benchmarks/: the layout every script follows, and every reference to a script names one that exists."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess

import pytest

from conftest import REPO

TOPICS = ("speed", "robustness", "trust", "scale", "docs")
SCRIPTS = sorted(path for path in (REPO / "benchmarks").glob("*/*.py") if path.name != "__init__.py")


def test_benchmarks_are_a_package_of_topics_with_empty_inits():
    assert (REPO / "benchmarks" / "__init__.py").read_text() == ""
    for topic in TOPICS:
        assert (REPO / "benchmarks" / topic / "__init__.py").read_text() == "", topic
    assert {path.parent.name for path in SCRIPTS} <= set(TOPICS)
    assert list((REPO / "benchmarks").glob("*.py")) == [REPO / "benchmarks" / "__init__.py"]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda path: f"{path.parent.name}/{path.stem}")
def test_every_benchmark_imports_as_a_module(path):
    module = importlib.import_module(f"benchmarks.{path.parent.name}.{path.stem}")
    assert module.__doc__, f"{path} has no docstring saying how to run it"


def _tracked_text_files() -> list:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    names = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.mjs", "*.js", "Makefile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / name for name in names if (REPO / name).is_file()]


def test_every_reference_to_a_benchmark_names_one_that_exists():
    """Paths (benchmarks/TOPIC/NAME.py) and modules (python -m benchmarks.TOPIC.NAME) in the
    code, tests and docs, so that a moved or renamed script leaves no stale pointer behind."""
    stale = []
    for path in _tracked_text_files():
        text = path.read_text(errors="replace")
        for match in re.finditer(r"(?<![\w./-])benchmarks/[a-z0-9_/]+\.(?:py|mjs|json)", text):
            if not (REPO / match[0]).is_file():
                stale.append(f"{path.relative_to(REPO)}: {match[0]}")
        for match in re.finditer(r"-m (benchmarks(?:\.[a-z0-9_]+)+)\b(?!\.)", text):
            if not (REPO / (match[1].replace(".", "/") + ".py")).is_file():
                stale.append(f"{path.relative_to(REPO)}: {match[0]}")
    assert stale == []
