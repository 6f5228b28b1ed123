"""The tensor headers of a checkpoint directory (name, dtype, shape), read without torch.

`Checkpoint` reads tensors, so it imports torch (seconds); what needs only names, dtypes and
shapes (`sparsify inspect` of an output, a native output's layout digest) reads them here.
The headers are parsed and validated by the safetensors library (`safe_open`, whose checks are
strict: the header is JSON of the right shape, every tensor's byte count is that of its dtype
and shape, and the tensors cover the data exactly, without gap or overlap); `SafetensorsFile`
starts with the same call and adds a parse of its own for the offsets it reads at, which a
reader of headers does not need. The files are found and placed as `Checkpoint` finds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..errors import SourceError
from .checkpoint import checkpoint_files, place_tensors

__all__ = ["DTYPE_NAMES", "TensorHeader", "file_headers", "read_headers"]

# safetensors dtype code -> torch dtype name: the dtypes sparsify reads (`safetensors_io.DTYPES`
# is built from this table).
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


class TensorHeader(NamedTuple):
    """A stored tensor's dtype (its safetensors code, e.g. "BF16") and shape."""

    dtype: str
    shape: tuple[int, ...]


def file_headers(path: Path) -> dict[str, TensorHeader]:
    """Every tensor of the safetensors file `path`, as the library reads and validates its
    header; a damaged file, or a dtype sparsify cannot convert, is a one-line `SourceError`."""
    from safetensors import safe_open

    try:
        # numpy: the framework the headers are read under ("pt" would import torch); no tensor is made
        with safe_open(str(path), framework="numpy") as f:
            headers = {}
            for name in f.keys():
                view = f.get_slice(name)
                headers[name] = TensorHeader(view.get_dtype(), tuple(view.get_shape()))
    except Exception as err:  # SafetensorError, and OSError for unreadable files
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        detail = detail.removeprefix("Error while deserializing header: ")[:200]
        raise SourceError(f"cannot read '{path}': the file is truncated or corrupt ({detail})") from None
    for name, h in headers.items():
        if h.dtype not in DTYPE_NAMES:
            raise SourceError(f"'{path}': tensor '{name}' has dtype {h.dtype}, which sparsify cannot convert")
    return headers


def read_headers(path: str | Path, spec: str | None = None) -> dict[str, TensorHeader] | None:
    """Every tensor of checkpoint directory `path` by its stored name, from the files
    transformers would load (`Checkpoint`'s, with its errors); None when those are `.bin`
    files, whose headers only `torch.load` reads."""
    path = Path(path)
    spec = spec or str(path)
    files, weight_map = checkpoint_files(path, spec)
    if not files[0].name.endswith(".safetensors"):
        return None
    opened = {f.name: file_headers(f) for f in files}
    return {name: opened[file][name] for name, file in place_tensors(spec, weight_map, opened).items()}
