"""pneumoscan.atomic: atomic writes and folder swaps, and what a crash inside a swap leaves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pneumoscan import atomic


def _folder(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "state.json").write_text(content)
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
def test_replace_dir_swaps_in_the_new_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    target = _folder(tmp_path / "checkpoint", "old")
    atomic.replace_dir_atomic(_folder(tmp_path / ".checkpoint.new", "new"), target)
    assert (target / "state.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    atomic.replace_dir_atomic(_folder(tmp_path / "fresh", "first"), tmp_path / "absent")  # no old folder
    assert (tmp_path / "absent" / "state.json").read_text() == "first"


def test_the_exchange_swaps_two_folders_in_one_step(tmp_path):
    """Linux's renameat2(RENAME_EXCHANGE) is what keeps `target` in place at every moment."""
    if os.uname().sysname != "Linux":
        pytest.skip("renameat2 is Linux's")
    first, second = _folder(tmp_path / "a", "a"), _folder(tmp_path / "b", "b")
    assert atomic._exchange(first, second)
    assert (first / "state.json").read_text() == "b" and (second / "state.json").read_text() == "a"


# (what the crash left: folder name -> content) -> content recovered at `checkpoint`
CRASH_CASES = [
    ("between the renames", {".checkpoint.old": "old", ".checkpoint.new": "new"}, "new"),
    ("after the renames, before cleaning up", {"checkpoint": "new", ".checkpoint.old": "old"}, "new"),
    ("only the old one aside", {".checkpoint.old": "old"}, "old"),
    ("while writing the new one", {"checkpoint": "old", ".checkpoint.new": "half"}, "old"),
]


@pytest.mark.parametrize("name, left, recovered", CRASH_CASES, ids=[c[0] for c in CRASH_CASES])
def test_recover_dir_puts_the_newest_complete_folder_back(tmp_path, name, left, recovered):
    for folder, content in left.items():
        _folder(tmp_path / folder, content)
    atomic.recover_dir(tmp_path / "checkpoint", tmp_path / ".checkpoint.new")
    assert (tmp_path / "checkpoint" / "state.json").read_text() == recovered
    assert not (tmp_path / ".checkpoint.old").exists() or "checkpoint" in left


def test_nothing_to_recover_is_a_no_op(tmp_path):
    atomic.recover_dir(tmp_path / "checkpoint", tmp_path / ".checkpoint.new")
    assert list(tmp_path.iterdir()) == []


def test_write_bytes_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "sub" / "history.csv"
    atomic.write_bytes_atomic(path, b"a,b\n1,2\n")
    atomic.write_bytes_atomic(path, b"a,b\n")
    assert path.read_bytes() == b"a,b\n"
    assert [p.name for p in path.parent.iterdir()] == ["history.csv"]  # no temporary left
    assert oct(path.stat().st_mode & 0o777) == "0o644"
