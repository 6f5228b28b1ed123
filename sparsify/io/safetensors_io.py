"""Streaming safetensors: read one tensor at a time, write shards as tensors are produced.

The safetensors library reads and writes whole state dicts; converting a checkpoint in bounded
memory needs one tensor at a time in (read with `pread`, so pages of the source do not pile up
in the process) and shards written while their tensors are produced (an expert stack is the same
source buffer written E times). The format is simple and fixed (an 8-byte header length, a JSON
header with offsets, then the bytes), so the reads and the writer are written here by hand.

Headers are validated by the library itself (`safe_open`, which parses and checks the header
without reading any tensor), so that sparsify accepts exactly the files it accepts. The library
does not tell where a tensor's bytes lie, so the header is then parsed here too, for the offsets
that `pread` needs, with the library's rules checked again: the offsets used are never ones it
would refuse, whatever its version.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .finite import cast_checked
from ..errors import OptionError, SourceError
from .headers import DTYPE_NAMES, file_headers
from .integrity import OutputFiles
from .paths import regular_file

__all__ = ["DTYPES", "TensorInfo", "SafetensorsFile", "OutputTensor", "plan_shards", "write_shards",
           "write_file", "library_order", "parse_size"]

DTYPES = {code: getattr(torch, name) for code, name in DTYPE_NAMES.items()}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # the library's limit (MAX_HEADER_SIZE)


def parse_size(size: int | str, what: str = "shard size") -> int:
    """'5GB' -> 5_000_000_000; '500MiB' -> 524_288_000; positive ints pass through. Anything
    else (zero, negative, NaN, infinite, unreadable) is an `OptionError` naming `what`."""
    if isinstance(size, int) and not isinstance(size, bool):
        value: float = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
        for unit, factor in units.items():
            if text.endswith(unit):
                number = text[: -len(unit)]
                break
        else:
            number, factor = text, 1
        try:
            value = float(number) * factor
        except ValueError:
            raise OptionError(f"cannot read {what} {size!r}; write it like 5GB or 500MiB") from None
    if not math.isfinite(value) or value < 1:
        raise OptionError(f"{what} must be a finite number of at least 1 byte, like 5GB or 500MiB; got {size!r}")
    return int(value)


@dataclass
class TensorInfo:
    """Where a tensor lives in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data."""
        return self.end - self.begin


class SafetensorsFile:
    """Header of a safetensors file, validated as the safetensors library validates it;
    `read(name)` reads one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = regular_file(self.path, "weights file").st_size
        file_headers(self.path)  # the library's validation first, and its messages
        with open(self.path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise self._damaged("shorter than its header")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise self._damaged("its header length runs past the end")
            raw = fh.read(n)
        self.metadata, self.tensors = self._parse(raw, 8 + n, size)

    def _damaged(self, why: str) -> SourceError:
        return SourceError(f"cannot read '{self.path}': the file is truncated or corrupt ({why})")

    def _parse(self, raw: bytes, start: int, size: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        try:
            header = json.loads(raw, object_pairs_hook=_unique_keys)
        except (ValueError, UnicodeDecodeError) as err:
            raise self._damaged(f"its header is not JSON: {err}") from None
        if not isinstance(header, dict):
            raise self._damaged("its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._damaged("__metadata__ is not a map of strings")
        entries = []
        for name, h in header.items():
            if not isinstance(h, dict):
                raise self._damaged(f"the entry of tensor '{name}' is not an object")
            code, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
            if not (_naturals(shape) and _naturals(offsets) and len(offsets) == 2 and isinstance(code, str)):
                raise self._damaged(f"tensor '{name}' has a malformed dtype, shape or data_offsets")
            if code not in DTYPES:
                raise SourceError(f"'{self.path}': tensor '{name}' has dtype {code}, which sparsify cannot convert")
            entries.append((offsets[0], offsets[1], name, tuple(shape)))
        tensors: dict[str, TensorInfo] = {}
        position = 0
        for begin, end, name, shape in sorted(entries):
            dtype = DTYPES[header[name]["dtype"]]
            if begin != position or end < begin:
                raise self._damaged(f"tensor '{name}' overlaps another or leaves a gap before it")
            if end - begin != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
                raise self._damaged(f"tensor '{name}' has {end - begin} bytes, not those of shape {list(shape)}")
            tensors[name] = TensorInfo(name, dtype, shape, start + begin, start + end)
            position = end
        if start + position != size:
            raise self._damaged("its tensors do not cover its data exactly")
        return metadata, tensors

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name`, or its rows `rows = (start, stop)` along the first dimension (an
        expert range of a stacked tensor, reading only those bytes), into fresh (64-byte
        aligned) memory. pread, not a memory map: mapped pages would stay resident (and count
        in the process's memory) after the tensor is gone."""
        info = self.tensors[name]
        shape, begin, nbytes = info.shape, info.begin, info.nbytes
        if rows is not None:
            start, stop = rows
            if not shape or not 0 <= start <= stop <= shape[0]:
                raise SourceError(f"'{self.path}': tensor '{name}' of shape {shape} has no rows {start}:{stop}")
            row = nbytes // shape[0] if shape[0] else 0
            shape, begin, nbytes = (stop - start, *shape[1:]), begin + start * row, (stop - start) * row
        out = torch.empty(shape, dtype=info.dtype)
        # flat first: a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        try:
            with open(self.path, "rb", buffering=0) as fh:
                got = 0
                while got < nbytes:
                    n = os.preadv(fh.fileno(), [view[got:]], begin + got)
                    if n <= 0:
                        raise self._damaged("it ended while reading")
                    got += n
        except OSError as err:
            raise SourceError(f"cannot read '{self.path}' ({err.strerror})") from None
        return out


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice")
    return out


def _naturals(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


@dataclass
class OutputTensor:
    """A tensor to write: name, dtype, shape, and a producer yielding its bytes in order as
    contiguous tensors (e.g. E expert copies making up a stacked [E, out, in] tensor)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_size` bytes (a larger tensor
    gets a shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[OutputTensor], metadata: dict[str, str] | None = None) -> bytes:
    # keys sorted: safetensors itself writes them in hash order, different from run to run
    header: dict[str, Any] = {"__metadata__": dict(sorted({"format": "pt", **(metadata or {})}.items()))}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # pad so that tensor data starts 8-byte aligned


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.contiguous().cpu()  # a model training on a GPU is saved from its device tensors
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_file(
    files: OutputFiles,
    name: str,
    tensors: list[OutputTensor],
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write one safetensors file `name` of `files` (its size and sha256 recorded there).
    `progress(nbytes)` is called as data is written."""
    header = _header(tensors, metadata)
    fh = files.open(name)
    try:
        fh.write(memoryview(struct.pack("<Q", len(header))))
        fh.write(memoryview(header))
        for t in tensors:
            written = 0
            for piece in t.produce():
                if piece.dtype != t.dtype:
                    piece = cast_checked(piece, t.dtype, t.name)
                data = _bytes_of(piece)
                fh.write(data)
                written += len(data)
                if progress:
                    progress(len(data))
            if written != t.nbytes:
                raise RuntimeError(f"producer of '{t.name}' gave {written} bytes, expected {t.nbytes}")
    except BaseException:
        fh.abort()
        raise
    fh.close()
    files.done(name, fh)


def write_shards(
    out_dir: Path,
    tensors: list[OutputTensor],
    max_shard_size: int | str = "5GB",
    progress: Callable[[int], None] | None = None,
    index_name: str | None = "model.safetensors.index.json",
    pattern: str = "model-{i:05d}-of-{n:05d}.safetensors",
    files: OutputFiles | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, str]:
    """Write `tensors` into shards under `out_dir` plus the index (none when `index_name` is
    None); returns tensor -> shard. `progress(nbytes)` is called as data is written; `files`
    records what was written; every shard's header carries `metadata` beside "format": "pt"."""
    files = files if files is not None else OutputFiles(out_dir)
    shards = plan_shards(tensors, parse_size(max_shard_size))
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = pattern.format(i=i + 1, n=len(shards))
        write_file(files, fname, shard, metadata=metadata, progress=progress)
        weight_map.update({t.name: fname for t in shard})
    total = sum(t.nbytes for t in tensors)
    if index_name is not None:
        files.write_text(index_name, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return weight_map


# safetensors' Dtype enum, in its order: `save_file` writes tensors by dtype, descending in this
# order, then by name. Writing in the same order makes a streamed file byte-identical to one
# written by the library from a state dict in memory.
_LIBRARY_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")


def library_order(tensors: list[OutputTensor]) -> list[OutputTensor]:
    """`tensors` in the order `safetensors.torch.save_file` writes them."""
    rank = {DTYPES[code]: i for i, code in enumerate(_LIBRARY_DTYPE_ORDER)}
    return sorted(tensors, key=lambda t: (-rank[t.dtype], t.name))
