"""Crash-safe output: build in a temporary sibling, fsync, rename into place.

A failed or interrupted run leaves no output directory, and an existing one is replaced only
with `force` and only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OutputError

__all__ = ["atomic_directory", "atomic_file", "check_output", "fsync_tree"]


def check_output(out: str | os.PathLike, force: bool) -> Path:
    """Validate an output path before any work: refuse an existing one without `force`, and a
    parent that does not exist or cannot be written."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"output '{out}' already exists; choose another path or pass --force to replace it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"cannot write '{out}': directory '{parent}' does not exist")
    # Probe by creating a file: os.access says yes to root even on read-only file systems.
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write '{out}': directory '{parent}' is not writable ({err.strerror})") from None
    return out


def fsync_tree(root: Path) -> None:
    """fsync every file below `root`, then the directories."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, out: Path, force: bool) -> None:
    old = None
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"output '{out}' appeared while writing; nothing was replaced")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    _fsync_dir(out.resolve().parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it becomes `out`, else it is removed."""
    out = check_output(out, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    try:
        yield tmp
        fsync_tree(tmp)
        _swap_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside `out`; on success it replaces `out`, else it is removed."""
    out = check_output(out, force)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _swap_into_place(tmp, out, force)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
