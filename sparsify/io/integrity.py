"""What an output's files must contain: the size and sha256 of each, recorded while writing.

An output directory's manifest (`sparsify.json`, or `shards.json` of `sparsify shard`) lists
under `files` every other file of the output:

    "files": {"model-00001-of-00002.safetensors": {"size": 4998176, "sha256": "9f2c..."}, ...}

Each hash is computed from the bytes as they pass through memory on their way to the disk
(`OutputFiles`), never by reading the output back. Loading checks the sizes (a stat per file);
`sparsify verify OUT` checks the hashes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..errors import SourceError
from .direct_write import OutputFile, open_output

__all__ = ["OutputFiles", "check_files", "hash_file", "files_of"]

_CHUNK = 4 << 20


class OutputFiles:
    """The files written into directory `root`, each with its size and sha256."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.records: dict[str, dict[str, Any]] = {}

    def record(self, name: str, size: int, sha256: str) -> None:
        """Note that `name` holds `size` bytes with this sha256."""
        self.records[name] = {"size": size, "sha256": sha256}

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small file in one piece."""
        (self.root / name).write_bytes(data)
        self.record(name, len(data), hashlib.sha256(data).hexdigest())

    def write_text(self, name: str, text: str) -> None:
        """Write a small UTF-8 text file."""
        self.write_bytes(name, text.encode())

    def copy(self, source: str | os.PathLike, name: str) -> None:
        """Copy `source` to `name`, hashing the bytes on their way through."""
        h, size = hashlib.sha256(), 0
        with open(source, "rb") as src, open(self.root / name, "wb") as dst:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                dst.write(chunk)
                size += len(chunk)
        self.record(name, size, h.hexdigest())

    def open(self, name: str) -> OutputFile:
        """A large file (see `sparsify.io.direct_write`); call `done(name, fh)` after closing it."""
        return open_output(self.root / name)

    def done(self, name: str, fh: OutputFile) -> None:
        """Record a file written through `open` and closed."""
        self.record(name, fh.size, fh.sha256)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The `files` entry of a manifest, in name order."""
        return {k: self.records[k] for k in sorted(self.records)}


def hash_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_of(manifest: dict[str, Any], where: str) -> dict[str, dict[str, Any]] | None:
    """The validated `files` entry of a manifest (None for outputs written before it existed)."""
    files = manifest.get("files")
    if files is None:
        return None
    ok = isinstance(files, dict) and all(
        isinstance(name, str) and name and "/" not in name and name not in (".", "..")
        and isinstance(r, dict) and type(r.get("size")) is int and r["size"] >= 0
        and isinstance(r.get("sha256"), str) and len(r["sha256"]) == 64
        for name, r in files.items()
    )
    if not ok:
        raise SourceError(f"'{where}' has a damaged 'files' entry; the output is damaged, write it again")
    return files


def check_files(root: str | os.PathLike, files: dict[str, dict[str, Any]] | None, manifest: str, hashes: bool = False) -> int:
    """Refuse, naming the first damaged file, when a file of `root` is missing, not of its
    recorded size, or (with `hashes`) not of its recorded sha256. Returns the files checked."""
    if files is None:
        return 0
    root = Path(root)
    for name, record in files.items():
        path = root / name
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise SourceError(f"'{path}' is missing, though {manifest} lists it; the output is incomplete, write it again") from None
        except OSError as err:
            raise SourceError(f"cannot read '{path}' ({err.strerror})") from None
        if size != record["size"]:
            raise SourceError(f"'{path}' has {size} bytes but {manifest} records {record['size']}; "
                              "the file is damaged (truncated or replaced), write the output again")
        if hashes and hash_file(path) != record["sha256"]:
            raise SourceError(f"'{path}' does not match the sha256 that {manifest} records; "
                              "the file is damaged, write the output again")
    return len(files)

