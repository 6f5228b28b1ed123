"""Crash-safe output: build in a temporary sibling, fsync, rename into place.

A failed or interrupted run leaves no output directory, and an existing one is replaced only
with `force` and only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OutputError
from ..units import format_bytes

__all__ = ["atomic_directory", "atomic_file", "check_output", "check_space", "clean_stale", "fsync_tree"]


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


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _swap_into_place(tmp: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"output '{out}' appeared while writing; nothing was replaced")
        # Swap in one step, so that at every instant OUT is either the old or the new output.
        if not _exchange(tmp, out):
            old = out.with_name(f".{out.name}.old-{os.getpid()}-swap")
            os.replace(out, old)
            os.replace(tmp, out)
            tmp = old
        _fsync_dir(out.resolve().parent)
        _remove(tmp)  # now the previous output
        return
    os.replace(tmp, out)
    _fsync_dir(out.resolve().parent)


def clean_stale(out: Path) -> None:
    """Remove temporary siblings of `out` left by runs that were killed (their pid is gone)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-")
    parent = out.resolve().parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if m and not _alive(int(m.group(2))):
            _remove(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_space(out: str | os.PathLike, needed: int) -> None:
    """Refuse before writing when the file system of `out` lacks `needed` bytes (+1%)."""
    parent = Path(out).resolve().parent
    free = shutil.disk_usage(parent).free
    if needed * 1.01 + (1 << 20) > free:
        raise OutputError(
            f"not enough disk space for '{out}': it needs {format_bytes(needed)} and {format_bytes(free)} are free; "
            "free some space or write elsewhere with -o"
        )


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it becomes `out`, else it is removed."""
    out = check_output(out, force)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.resolve().parent))
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
    clean_stale(out)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.resolve().parent)
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
