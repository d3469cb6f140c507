"""The light install (`pip install pneumoscan`, `make demo`): what runs without the training extra,
and the one sentence for what does not.

Each test runs `pneumoscan` in a subprocess whose imports see only what requirements-demo.lock
installs: a sitecustomize on PYTHONPATH puts a finder first on the import path that refuses every
installed package outside the light set (TensorFlow, Keras, matplotlib, absl, h5py, ...), as an
import in a venv without them would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.request
from importlib import metadata

import pytest

from conftest import REPO, SAMPLES, needs_node

DEMO_LOCK = REPO / "requirements-demo.lock"
TIMEOUT_S = 120
# What a light venv holds besides the lock: the package, and the installer's own tools.
ALSO_THERE = {"pneumoscan", "pip", "setuptools", "pkg_resources", "_distutils_hack"}

SITECUSTOMIZE = """
import sys

HIDDEN = frozenset({hidden!r})


class HideTheTrainingExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, HideTheTrainingExtra())
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def hidden_modules() -> set[str]:
    """Top-level import names of the installed distributions that the light lock does not hold."""
    light = {canonical(line.partition("==")[0]) for line in DEMO_LOCK.read_text().split()}
    return {
        module
        for module, distributions in metadata.packages_distributions().items()
        if not any(canonical(d) in light for d in distributions)
    } - ALSO_THERE


@pytest.fixture(scope="module")
def light_env(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("light")
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(SITECUSTOMIZE.format(hidden=sorted(hidden_modules())))
    )
    path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def pneumoscan(env, *argv, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pneumoscan", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO,
        check=False,
        **kwargs,
    )


def test_the_training_extra_is_hidden_and_the_light_set_is_not(light_env):
    assert {"tensorflow", "keras", "matplotlib", "absl", "h5py"} <= hidden_modules()
    code = (
        "import importlib\n"
        "for name in ('tensorflow', 'keras', 'matplotlib.pyplot', 'absl.logging'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as error:\n"
        "        print('hidden', error.name)\n"
        "import numpy, PIL, pydicom, rich, ai_edge_litert\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=light_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:4] == [
        "hidden tensorflow",
        "hidden keras",
        "hidden matplotlib",  # a submodule's import fails at its package
        "hidden absl",
    ]


def test_help_runs_without_the_training_extra(light_env):
    done = pneumoscan(light_env, "--help")
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "demo" in done.stdout and done.stderr == ""


@needs_node
@pytest.mark.slow
def test_demo_serves_without_the_training_extra(light_env):
    process = subprocess.Popen(
        [sys.executable, "-m", "pneumoscan", "demo", "--port", "0"],
        env=light_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        line = process.stdout.readline()
        url = re.search(r"on (http://\S+/)$", line.strip())
        assert url, (line, process.stderr.read() if process.poll() is not None else "")
        with urllib.request.urlopen(url.group(1) + "healthz", timeout=TIMEOUT_S) as response:
            assert response.status == 200
            assert json.loads(response.read())["model"]
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT_S)


@pytest.mark.parametrize(
    ("argv", "package"),
    [
        (["train", "--data", "DATA", "--out", "RUN"], "TensorFlow"),
        (["export", "--model", "RUN", "--out", "BUNDLE"], "TensorFlow"),
    ],
)
def test_a_training_command_says_which_extra_to_install(light_env, tmp_path, argv, package):
    argv = [str(tmp_path / a) if a.isupper() else a for a in argv]
    done = pneumoscan(light_env, *argv)
    assert done.returncode == 1
    assert done.stderr == missing_extra_line(argv[0], package)
    assert done.stdout == "" and not (tmp_path / "RUN").exists()


@pytest.mark.parametrize(
    "argv",
    [
        # The report's plots (matplotlib), after the metrics.
        ["evaluate", "--data", str(SAMPLES), "--out", "OUT"],
    ],
)
def test_the_extra_is_named_whichever_of_its_packages_is_missing_first(light_env, tmp_path, argv):
    argv = [str(tmp_path / a) if a.isupper() else a for a in argv]
    done = pneumoscan(light_env, *argv)
    assert done.returncode == 1
    package = re.search(r"needs (\w+), which", done.stderr)
    assert package and package[1] in {"TensorFlow", "Keras", "matplotlib"}, done.stderr
    assert done.stderr.endswith(missing_extra_line(argv[0], package[1]))
    assert "Traceback" not in done.stderr and done.stderr.count("pneumoscan: error:") == 1


def missing_extra_line(command: str, package: str) -> str:
    return (
        f"pneumoscan: error: pneumoscan {command} needs {package}, which this installation lacks; "
        "install the training dependencies with pip install 'pneumoscan[train]' "
        "(or make test in a checkout).\n"
    )


def test_predict_runs_without_the_training_extra(light_env):
    image = str(next(SAMPLES.rglob("*.jpeg")))
    done = pneumoscan(light_env, "predict", "--format", "csv", image)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 2 and image in done.stdout


@pytest.mark.parametrize("method", ["cam", "occlusion"])
def test_explain_runs_without_the_training_extra(light_env, tmp_path, method):
    """CAM and occlusion run on the flatbuffer (occlusion as forward passes of occluded copies)
    and the overlays are drawn with Pillow: no TensorFlow, Keras or matplotlib."""
    folder = SAMPLES / "NORMAL"
    argv = ["explain", "--method", method, "--format", "json", "--out", str(tmp_path), str(folder)]
    done = pneumoscan(light_env, *argv)
    assert done.returncode == 0, done.stderr
    pngs = sorted(tmp_path.glob(f"*_{method}.png"))
    assert pngs and len(pngs) == len(list(folder.iterdir()))
    assert all(png.read_bytes().startswith(b"\x89PNG") for png in pngs)
