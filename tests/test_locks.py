"""The two lock files and pyproject.toml tell one story.

requirements-demo.lock (what `make demo` installs: inference and the page) is the whole closure of
the package's own dependencies, and a subset of requirements.lock (what `make test` installs:
training and the tests too) with the same pins, so that either target after the other leaves a
working venv and neither downgrades anything; pyproject.toml pins what the locks pin. The locks
are for this platform (Linux x86_64, CPython 3.11); pyproject's markers say what other platforms get.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from conftest import REPO

FULL_LOCK = REPO / "requirements.lock"
DEMO_LOCK = REPO / "requirements-demo.lock"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# The platforms LiteRT 2.3.0 ships wheels for (pip download --only-binary=:all: --platform ...;
# README, "Install"), and some it does not: (platform_system, platform_machine).
LITERT_PLATFORMS = [("Linux", "x86_64"), ("Linux", "aarch64"), ("Darwin", "arm64"), ("Windows", "AMD64")]
OTHER_PLATFORMS = [("Darwin", "x86_64"), ("Windows", "ARM64"), ("Linux", "ppc64le"), ("Linux", "s390x")]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path) -> dict[str, str]:
    """canonical name -> pinned version; every line `name==version`, no name twice."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, equals, version = line.partition("==")
        assert equals and name and version and " " not in line, f"{path.name}: not a pin: {line!r}"
        assert canonical(name) not in pins, f"{path.name}: {name} twice"
        pins[canonical(name)] = version
    return pins


def requirements(group: str | None = None) -> list[Requirement]:
    """The base dependencies (group None) or an extra's."""
    texts = PROJECT["dependencies"] if group is None else PROJECT["optional-dependencies"][group]
    return [Requirement(text) for text in texts]


def applies(requirement: Requirement, system: str | None = None, machine: str | None = None) -> bool:
    """Whether the requirement's marker holds here, or on the platform named."""
    if requirement.marker is None:
        return True
    environment = {"extra": ""}
    if system is not None:
        environment |= {"platform_system": system, "platform_machine": machine}
    return requirement.marker.evaluate(environment)


def pinned(requirement: Requirement) -> str:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"pyproject.toml: {requirement} is not pinned with =="
    return specifier.version


# What a venv comes with and pip looks after itself: no lock pins them.
INSTALLER_TOOLS = {"pip", "setuptools", "wheel"}


def closure(roots: list[Requirement]) -> set[str]:
    """Canonical names of `roots` and everything they need here, from the installed metadata,
    less the installer's own tools."""
    found: set[str] = set(INSTALLER_TOOLS)
    todo = [r for r in roots if applies(r)]
    while todo:
        requirement = todo.pop()
        name = canonical(requirement.name)
        if name in found:
            continue
        found.add(name)
        for text in metadata.requires(requirement.name) or []:
            needed = Requirement(text)
            if needed.marker is None or needed.marker.evaluate({"extra": ""}):
                todo.append(needed)
    return found - INSTALLER_TOOLS


def test_the_demo_lock_is_a_subset_of_the_full_lock_with_the_same_pins():
    full, demo = read_lock(FULL_LOCK), read_lock(DEMO_LOCK)
    assert set(demo) <= set(full), sorted(set(demo) - set(full))
    assert {name: full[name] for name in demo} == demo


def test_the_demo_lock_is_the_closure_of_the_base_dependencies_and_holds_no_tensorflow():
    demo = read_lock(DEMO_LOCK)
    assert set(demo) == closure(requirements())
    assert not {"tensorflow", "tensorflow-cpu", "keras", "matplotlib", "h5py"} & set(demo)


def test_the_full_lock_holds_every_group_and_only_what_they_need():
    groups = requirements() + [r for group in PROJECT["optional-dependencies"] for r in requirements(group)]
    assert set(read_lock(FULL_LOCK)) == closure(groups)


@pytest.mark.parametrize("group", [None, *PROJECT["optional-dependencies"]])
def test_pyproject_pins_what_the_locks_pin(group):
    full, demo = read_lock(FULL_LOCK), read_lock(DEMO_LOCK)
    for requirement in requirements(group):
        name = canonical(requirement.name)
        if name == "tensorflow":  # the same release as tensorflow-cpu, which Linux x86_64 installs
            name = "tensorflow-cpu"
        assert pinned(requirement) == full[name], requirement
        if group is None and applies(requirement):
            assert demo[canonical(requirement.name)] == pinned(requirement), requirement


def test_the_installed_versions_are_the_locked_ones():
    """The venv the tests run in was made from requirements.lock (`make test`)."""
    wrong = {
        name: (version, metadata.version(name))
        for name, version in read_lock(FULL_LOCK).items()
        if metadata.version(name) != version
    }
    assert wrong == {}


@pytest.mark.parametrize(("system", "machine"), LITERT_PLATFORMS + OTHER_PLATFORMS)
def test_each_platform_gets_litert_or_else_keras_for_inference(system, machine):
    base = {canonical(r.name) for r in requirements() if applies(r, system, machine)}
    assert {"numpy", "pillow", "pydicom", "rich"} <= base
    if (system, machine) in LITERT_PLATFORMS:
        assert "ai-edge-litert" in base and not {"tensorflow", "keras"} & base
    else:
        assert "ai-edge-litert" not in base and {"tensorflow", "keras"} <= base
    # The training extra installs TensorFlow and Keras everywhere, once.
    train = [canonical(r.name) for r in requirements("train") if applies(r, system, machine)]
    tensorflow = "tensorflow-cpu" if (system, machine) == ("Linux", "x86_64") else "tensorflow"
    assert sorted(train) == sorted([tensorflow, "keras", "h5py", "tensorboard", "matplotlib"])
