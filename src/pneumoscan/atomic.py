"""Small file helpers shared by every stage: writes that are never half-done, and that survive a
crash or a power cut once they return (files and their folders are fsynced)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically (Linux >= 3.15)
_AT_FDCWD = -100


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (new, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder, deepest first."""
    folders = []
    for folder, _, files in os.walk(root):
        folders.append(Path(folder))
        for name in files:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for folder in reversed(folders):
        fsync_dir(folder)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any) -> None:
    write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


def save_model_atomic(model: Any, path: Path) -> None:
    """`model.save` to a temporary name in the same folder, fsync, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    model.save(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    return result == 0


def replace_dir_atomic(build: Path, target: Path) -> None:
    """Swap a fully written folder `build` into place at `target`, durably.

    Where the system can (Linux), the two folders trade places in one atomic step, so `target`
    is always either the old or the new folder. Elsewhere `target` moves aside to
    `.<name>.old` and `build` takes its place: a crash between the two renames leaves no
    `target`, which `recover_dir` puts back.
    """
    build, target = Path(build), Path(target)
    fsync_tree(build)
    if target.exists() and _exchange(build, target):
        fsync_dir(target.parent)
        shutil.rmtree(build)  # now the old folder
        return
    old = _old(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(build, target)
    fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(target: Path, build: Path) -> None:
    """After a crash between `replace_dir_atomic`'s two renames (no `target`, `.<name>.old` left):
    put the newest complete folder back at `target`. `build` is the folder that was being swapped
    in: it is complete once the old one has moved aside."""
    target, build = Path(target), Path(build)
    old = _old(target)
    if target.exists() or not old.exists():
        return
    os.replace(build if build.exists() else old, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")
