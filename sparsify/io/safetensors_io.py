"""Streaming safetensors: read one tensor at a time, write shards as tensors are produced.

The safetensors library reads and writes whole state dicts; converting a checkpoint in bounded
memory needs one tensor at a time in (read with `pread`, so pages of the source do not pile up
in the process) and shards written while their tensors are produced (an expert stack is the same
source buffer written E times). The format is simple and fixed (an 8-byte header length, a JSON
header with offsets, then the bytes), so the reader and writer are written here by hand.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import SourceError
from .direct_write import open_output

__all__ = ["DTYPES", "TensorInfo", "SafetensorsFile", "OutputTensor", "plan_shards", "write_shards", "parse_size"]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000; '500MiB' -> 524_288_000; ints pass through."""
    if isinstance(size, int):
        return size
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
        raise SourceError(f"cannot read size {size!r}; write it like 5GB or 500MiB") from None
    if value <= 0:
        raise SourceError(f"size must be positive, got {size!r}")
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
    """Header of a safetensors file, validated against its size; `read(name)` reads one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        problem = f"cannot read '{self.path}': the file is truncated or corrupt"
        with open(self.path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise SourceError(problem)
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise SourceError(problem)
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise SourceError(problem) from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.tensors: dict[str, TensorInfo] = {}
        start = 8 + n
        for name, h in header.items():
            dtype = DTYPES.get(h.get("dtype"))
            begin, end = h.get("data_offsets", (0, -1))
            shape = tuple(h.get("shape", ()))
            if dtype is None or end < begin:
                raise SourceError(problem)
            item = torch.empty((), dtype=dtype).element_size()
            if (end - begin) != math.prod(shape) * item or start + end > size:
                raise SourceError(f"{problem} (tensor '{name}' runs past its end)")
            self.tensors[name] = TensorInfo(name, dtype, shape, start + begin, start + end)

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, read into fresh (64-byte aligned) memory."""
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        # flat first: a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if info.nbytes else memoryview(b"")
        with open(self.path, "rb", buffering=0) as fh:
            got = 0
            while got < info.nbytes:
                n = os.preadv(fh.fileno(), [view[got:]], info.begin + got)
                if n <= 0:
                    raise SourceError(f"cannot read '{self.path}': the file is truncated or corrupt")
                got += n
        return out


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


def _header(tensors: list[OutputTensor]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # pad so that tensor data starts 8-byte aligned


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_shards(
    out_dir: Path,
    tensors: list[OutputTensor],
    max_shard_size: int | str = "5GB",
    progress: Callable[[int], None] | None = None,
    index_name: str = "model.safetensors.index.json",
    pattern: str = "model-{i:05d}-of-{n:05d}.safetensors",
) -> dict[str, str]:
    """Write `tensors` into shards under `out_dir` plus the index; returns tensor -> shard.
    `progress(nbytes)` is called as data is written."""
    shards = plan_shards(tensors, parse_size(max_shard_size))
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = pattern.format(i=i + 1, n=len(shards))
        header = _header(shard)
        fh = open_output(out_dir / fname)
        try:
            fh.write(memoryview(struct.pack("<Q", len(header))))
            fh.write(memoryview(header))
            for t in shard:
                written = 0
                for piece in t.produce():
                    if piece.dtype != t.dtype:
                        piece = piece.to(t.dtype)
                    data = _bytes_of(piece)
                    fh.write(data)
                    written += len(data)
                    if progress:
                        progress(len(data))
                if written != t.nbytes:
                    raise RuntimeError(f"producer of '{t.name}' gave {written} bytes, expected {t.nbytes}")
                weight_map[t.name] = fname
        except BaseException:
            fh.abort()
            raise
        fh.close()
    total = sum(t.nbytes for t in tensors)
    (out_dir / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return weight_map


