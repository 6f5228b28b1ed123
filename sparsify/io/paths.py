"""Where an output may go, and what may be read as an input file.

Every writer calls `check_output` before any work (and the atomic writers call it again when the
write starts), so that one rule holds for every command: paths are resolved (symlinks followed)
before anything is decided, an output never is, holds or lies inside a source, `force`
replaces only a directory by a directory and a file by a file, and the current directory and
those above it are never replaced.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Iterable

from ..errors import OutputError, SourceError

__all__ = ["real_path", "check_output", "regular_file", "probe_writable"]


def real_path(path: str | os.PathLike) -> Path:
    """`path` absolute with every symlink followed (also for parts that do not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _inside(inner: Path, outer: Path) -> bool:
    return inner != outer and outer in inner.parents


def _source_paths(source: str | os.PathLike) -> Iterable[Path]:
    """The real path of `source`, and for a directory the real targets of its symlinked entries
    (a Hugging Face snapshot is a directory of links into `blobs/`)."""
    real = real_path(source)
    yield real
    if real.is_dir():
        try:
            entries = list(os.scandir(real))
        except OSError:
            return
        for entry in entries:
            if entry.is_symlink():
                yield real_path(entry.path)


def _kind_of(path: Path) -> str | None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def check_output(
    out: str | os.PathLike,
    force: bool = False,
    sources: Iterable[str | os.PathLike | None] = (),
    *,
    kind: str,
) -> Path:
    """Refuse an output path before any work; returns `out` as a Path.

    `sources` are every path the command reads (directories or files; None is skipped). `kind`
    is what will be written there: "dir" or "file". Refused, with or without `force`: an output
    that is, holds or lies inside a source; one that is the current directory or above it; one
    of the other kind. Refused without `force`: one that exists. Also: a parent directory that
    does not exist or cannot be written."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    out = Path(out)
    target = real_path(out)
    cwd = real_path(".")
    if target == cwd or _inside(cwd, target):
        where = "the current directory" if target == cwd else "a directory above the current one"
        raise OutputError(f"output '{out}' is {where}, which is never replaced; name a new {_noun(kind)}, e.g. {_example(kind)}")
    for source in sources:
        if source is None:
            continue
        for real in _source_paths(source):
            if target == real:
                relation = "is"
            elif _inside(real, target):
                relation = "holds"
            elif _inside(target, real):
                relation = "lies inside"
            else:
                continue
            raise OutputError(f"output '{out}' {relation} the source '{source}', which is never replaced or written into "
                              "(not even with --force / force=True); choose an output path outside it")
    existing = _kind_of(target)
    if existing is not None:
        if not force:
            raise OutputError(f"output '{out}' already exists; choose another path or pass --force (force=True) to replace it")
        if existing != kind:
            what = {"dir": "a directory", "file": "a file"}.get(existing, "not a regular file or directory")
            raise OutputError(f"output '{out}' is {what}, and --force (force=True) replaces only {_noun(kind, article=True)} by a new one; "
                              f"choose another path or remove it yourself")
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write '{out}': directory '{parent}' does not exist")
    probe_writable(target)
    return out


def _noun(kind: str, article: bool = False) -> str:
    noun = "directory" if kind == "dir" else "file"
    return f"a {noun}" if article else noun


def _example(kind: str) -> str:
    return "-o ./moe" if kind == "dir" else "-o ./out.json"


def probe_writable(target: Path) -> None:
    """Refuse when the directory that will hold `target` cannot be written. The probe creates a
    file, since os.access says yes to root even on read-only file systems."""
    from .atomic import temp_path  # the probe is named like a temporary, so stale ones are cleaned

    probe = temp_path(target, "probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"cannot write '{target}': directory '{target.parent}' is not writable ({err.strerror})") from None


def regular_file(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """The stat of `path` if it is a regular file (symlinks followed); else a one-line
    `SourceError` saying what it is instead. Never opens it, so a FIFO cannot block."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise SourceError(f"{what} '{path}' is a broken symbolic link (to '{os.readlink(path)}'); "
                              "the download is incomplete, fetch the model again") from None
        raise SourceError(f"{what} '{path}' does not exist") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SourceError(f"{what} '{path}' is a symbolic link loop; fix or remove the link") from None
        raise SourceError(f"cannot read {what} '{path}' ({err.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{what} '{path}' is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise SourceError(f"{what} '{path}' is not a regular file (a pipe, socket or device); pass a regular file")
    return st
