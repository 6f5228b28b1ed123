"""Read whole tensors or ranges of experts from safetensors files, logging every read.

`safe_open(...).get_slice(name)[a:b]` reads only the bytes of rows a..b of a tensor stored
[E, ...], which is how one rank reads its experts out of a stacked checkpoint. The log (file,
tensor, rows, bytes) is what lets a caller, or a test, check that a rank read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open

from ..errors import SourceError
from ..io.paths import regular_file

__all__ = ["ReadRecord", "CheckpointReader", "runs"]


@dataclass
class ReadRecord:
    """One read: rows `start:stop` of `tensor` in `file` (None: the whole tensor), `nbytes`."""

    file: str
    tensor: str
    start: int | None
    stop: int | None
    nbytes: int


def runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending ids as half-open contiguous ranges: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    out: list[tuple[int, int]] = []
    for i in sorted(ids):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # safetensors aligns tensors to 8 bytes only; BLAS takes other code paths (other rounding)
    # on such data, so re-allocate to compute exactly as the saved model did.
    return t if t.data_ptr() % 64 == 0 else t.clone()


class CheckpointReader:
    """Open safetensors files under `root` lazily; `log` lists every tensor or range read."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.log: list[ReadRecord] = []
        self._files: dict[str, Any] = {}

    def _open(self, file: str) -> Any:
        if file not in self._files:
            path = self.root / file
            if not (path.exists() or path.is_symlink()):
                raise SourceError(f"'{file}' is missing from '{self.root}'; the checkpoint is incomplete")
            regular_file(path, "weights file")
            try:
                self._files[file] = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as err:
                raise SourceError(f"cannot read '{path}' ({err}); the file is truncated or corrupt") from None
        return self._files[file]

    def keys(self, file: str) -> list[str]:
        """The tensor names stored in `file`."""
        return list(self._open(file).keys())

    def info(self, file: str, name: str) -> tuple[str, tuple[int, ...]]:
        """The safetensors dtype code ("F32", ...) and shape of tensor `name` in `file`, read
        from the header only."""
        try:
            sl = self._open(file).get_slice(name)
            return sl.get_dtype(), tuple(sl.get_shape())
        except (SafetensorError, OSError) as err:
            raise SourceError(f"cannot read tensor '{name}' of '{self.root / file}' ({err}); the file is corrupt") from None

    def metadata(self, file: str) -> dict[str, str]:
        """The string metadata of `file`'s header."""
        return dict(self._open(file).metadata() or {})

    def tensor(self, file: str, name: str) -> torch.Tensor:
        """The whole tensor `name` of `file`."""
        try:
            t = self._open(file).get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise SourceError(f"cannot read tensor '{name}' of '{self.root / file}' ({err}); the file is corrupt") from None
        self.log.append(ReadRecord(file, name, None, None, t.numel() * t.element_size()))
        return _aligned(t)

    def experts(self, file: str, name: str, ids: Sequence[int]) -> torch.Tensor:
        """Rows `ids` (ascending expert numbers) of the stacked tensor `name`, reading only them."""
        try:
            sl = self._open(file).get_slice(name)
            parts = []
            for a, b in runs(ids):
                part = sl[a:b]
                self.log.append(ReadRecord(file, name, a, b, part.numel() * part.element_size()))
                parts.append(part)
        except (SafetensorError, OSError) as err:
            raise SourceError(f"cannot read tensor '{name}' of '{self.root / file}' ({err}); the file is corrupt") from None
        return _aligned(torch.cat(parts)) if len(parts) != 1 else _aligned(parts[0])

    @property
    def bytes_read(self) -> int:
        """Bytes of tensor data read so far."""
        return sum(r.nbytes for r in self.log)

    @property
    def files_opened(self) -> list[str]:
        """The files opened so far."""
        return sorted(self._files)

    def close(self) -> None:
        """Release the open files."""
        self._files.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
