"""Crash-safe output: build in a temporary beside the output, fsync, rename into place.

A failed or interrupted run leaves no output, and an existing one is replaced only with `force`
and only by a complete new one. Everything happens at the output's *resolved* location, so the
renames stay on its own file system (an output that is a symlink to another disk works). The
previous output is swapped out in one step (renameat2 RENAME_EXCHANGE) where the kernel allows
it, else by two renames; whatever step fails, it is back in place before the error is raised.

Temporaries are named `.OUT.tmp-HOST-PID-RANDOM`: a later run removes only those of this host
whose process is gone, never a live run's on another host sharing the file system. The
temporaries this process holds are listed (`live_temporaries`), so that a signal handler can
say what was being written (see `sparsify.io.signals`).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import OutputError, SourceError
from ..units import format_bytes
from .paths import check_output, real_path
from .signals import deferred_signals

__all__ = ["atomic_directory", "atomic_file", "check_output", "check_space", "clean_stale", "fsync_tree",
           "scratch_directory", "temp_path", "live_temporaries", "completed_writes", "remove_live_temporaries", "Write"]

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
_NAME_KEEP = 100  # characters of OUT's name kept in a temporary's name (names are limited to 255)


@dataclass
class Write:
    """An output being written: what the user named, and whether a previous one exists."""

    out: Path
    existed: bool


_LIVE: dict[Path, Write] = {}
_DONE: collections.deque[Path] = collections.deque(maxlen=32)


def live_temporaries() -> dict[Path, Write]:
    """Temporary path -> the write it belongs to, for every write in progress in this process."""
    return dict(_LIVE)


def completed_writes() -> list[Path]:
    """The outputs (as the user named them) this process has put in place, latest last."""
    return list(_DONE)


def remove_live_temporaries() -> None:
    """Remove every temporary this process still holds (a last resort of signal handling)."""
    for tmp in list(_LIVE):
        _remove(tmp)
        _LIVE.pop(tmp, None)


def temp_path(target: Path, role: str = "tmp") -> Path:
    """A fresh temporary path beside `target` (resolved), named for this host and process."""
    return target.with_name(f".{target.name[:_NAME_KEEP]}.{role}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def clean_stale(out: str | os.PathLike) -> None:
    """Remove temporaries beside `out` left by runs of this host whose process is gone; a
    previous output left aside by a swap that never finished is put back instead."""
    target = real_path(out)
    pattern = re.compile(rf"^\.{re.escape(target.name[:_NAME_KEEP])}\.(tmp|old|probe)-{re.escape(_HOST)}-(\d+)-[0-9a-f]+$")
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.match(entry.name)
        if m and not _alive(int(m.group(2))):
            if m.group(1) == "old" and not os.path.lexists(target):
                # A run killed between the two renames of a swap: this is the previous output,
                # put back (or, if that fails, left where it is; never removed).
                with contextlib.suppress(OSError):
                    os.rename(entry, target)
                continue
            _remove(entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_tree(root: Path) -> None:
    """fsync every file below `root`, then the directories."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flags: int) -> int:
    """Linux renameat2: 0 on success, else the errno (ENOSYS where the call is missing)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return errno.ENOSYS
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return 0
    return ctypes.get_errno()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _kind(path: Path) -> str | None:
    if not os.path.lexists(path):
        return None
    return "dir" if path.is_dir() else "file"


def _swap_into_place(tmp: Path, target: Path, out: Path, force: bool, kind: str) -> None:
    """Put `tmp` at `target`. Signals wait until this is done, and every failure leaves the
    previous output, if any, where it was."""
    existing = _kind(target)
    if existing is None:
        rc = _renameat2(tmp, target, _RENAME_NOREPLACE)  # no-clobber: a racing writer's output stays
        if rc in (errno.ENOSYS, errno.EINVAL):
            os.replace(tmp, target)
        elif rc == errno.EEXIST:
            raise OutputError(f"output '{out}' appeared while writing; nothing was replaced")
        elif rc:
            raise OSError(rc, os.strerror(rc), str(target))
        _settle(target)
        return
    if not force:
        raise OutputError(f"output '{out}' appeared while writing; nothing was replaced")
    if existing != kind:
        raise OutputError(f"output '{out}' became a {'directory' if existing == 'dir' else 'file'} while writing; nothing was replaced")
    rc = _renameat2(tmp, target, _RENAME_EXCHANGE)  # one step: OUT is the old or the new output at every instant
    if rc == 0:
        old = tmp
    elif rc in (errno.ENOSYS, errno.EINVAL):
        old = temp_path(target, "old")
        try:
            os.rename(target, old)
            os.rename(tmp, target)
        except BaseException:
            # Decided by what is on disk, not by which call returned: an exception can arrive
            # between a rename and the next statement.
            if not os.path.lexists(target) and os.path.lexists(old):
                try:
                    os.rename(old, target)
                except OSError as err:
                    raise OutputError(f"cannot write '{out}', nor put the previous one back ({err.strerror}); "
                                      f"it is at '{old}', rename it to '{target}'") from None
            raise
    else:
        raise OSError(rc, os.strerror(rc), str(target))
    _LIVE[old] = _LIVE.get(tmp, Write(out, True))
    _settle(target)
    _remove(old)  # now the previous output
    _LIVE.pop(old, None)


def _settle(target: Path) -> None:
    """Make the rename that put `target` in place durable. The new output is in place already,
    so a failure here must not be reported as a failed write."""
    with contextlib.suppress(OSError):
        _fsync(target.parent)


def check_space(out: str | os.PathLike, needed: int) -> None:
    """Refuse before writing when the file system that will hold `out` lacks `needed` bytes
    (plus 1% and 1 MB for file system overhead)."""
    parent = real_path(out).parent
    free = shutil.disk_usage(parent).free
    if needed * 1.01 + (1 << 20) > free:
        raise OutputError(f"not enough disk space for '{out}': it needs {format_bytes(needed)} and "
                          f"{format_bytes(free)} are free on {parent}; free some space or write elsewhere")


def _write_error(err: OSError, out: Path, tmp: Path, existed: bool) -> OutputError | SourceError:
    """A one-line error for an OSError raised while writing `out` through `tmp`."""
    kept = f"; the previous '{out}' is untouched" if existed else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(tmp.parent).free
        return OutputError(f"the disk holding '{out}' filled up while writing it ({format_bytes(free)} free now); "
                           f"nothing was written{kept}; free some space or write elsewhere")
    name = err.filename if isinstance(err.filename, str) else None
    if name and not (Path(name) == tmp or tmp in Path(name).parents or Path(name).parent == tmp.parent):
        return SourceError(f"cannot read '{name}' ({err.strerror}); nothing was written{kept}")
    return OutputError(f"cannot write '{out}' ({err.strerror or err}); nothing was written{kept}")


@contextlib.contextmanager
def _atomic(out: str | os.PathLike, force: bool, sources: Iterable, kind: str) -> Iterator[Path]:
    out = check_output(out, force, sources, kind=kind)
    target = real_path(out)
    clean_stale(target)
    existed = _kind(target) is not None
    with deferred_signals():  # a temporary exists only once it is listed
        tmp = temp_path(target)
        if kind == "dir":
            os.mkdir(tmp, 0o777)  # the umask decides, as for any directory the user makes
        else:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        _LIVE[tmp] = Write(out, existed)
    try:
        yield tmp
        if kind == "dir":
            fsync_tree(tmp)
        else:
            _fsync(tmp)
        with deferred_signals():
            _swap_into_place(tmp, target, out, force, kind)
            _LIVE.pop(tmp, None)
            _DONE.append(out)
    except BaseException as err:
        with deferred_signals():
            _remove(tmp)
            _LIVE.pop(tmp, None)
        if isinstance(err, OSError):
            raise _write_error(err, out, tmp, existed) from None
        raise


@contextlib.contextmanager
def scratch_directory(beside: str | os.PathLike) -> Iterator[Path]:
    """A working directory beside `beside` (resolved; named and cleaned like a temporary),
    removed when the block ends, whatever happens."""
    target = real_path(beside)
    with deferred_signals():
        tmp = temp_path(target)
        os.mkdir(tmp, 0o700)
        _LIVE[tmp] = Write(Path(beside), _kind(target) is not None)
    try:
        yield tmp
    finally:
        with deferred_signals():
            _remove(tmp)
            _LIVE.pop(tmp, None)


def atomic_directory(out: str | os.PathLike, force: bool = False, sources: Iterable = ()) -> Iterator[Path]:
    """A context manager yielding a temporary directory beside `out`; on success it becomes
    `out` (checked first with `check_output(out, force, sources)`), else it is removed."""
    return _atomic(out, force, sources, "dir")


def atomic_file(out: str | os.PathLike, force: bool = False, sources: Iterable = ()) -> Iterator[Path]:
    """A context manager yielding a temporary file path beside `out`; on success it replaces
    `out` (checked first with `check_output(out, force, sources, "file")`), else it is removed."""
    return _atomic(out, force, sources, "file")
