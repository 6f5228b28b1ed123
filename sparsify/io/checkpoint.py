"""A source checkpoint directory read one tensor at a time (safetensors, or `.bin` via
`torch.load(weights_only=True, mmap=True)`), with its problems reported up front.

The weight files are exactly those transformers would load: the files an index names
(`model.safetensors.index.json`, else `pytorch_model.bin.index.json`), else the single
`model.safetensors`, else `pytorch_model.bin`. Other files beside them (a stray
`x.safetensors`, an adapter) are never read, so they cannot override a weight.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Collection

from ..errors import SourceError
from .paths import regular_file

if TYPE_CHECKING:  # `weight_files` and `read_index` find an output's files without torch (`sparsify inspect`)
    import torch

    from .safetensors_io import SafetensorsFile

__all__ = ["Checkpoint", "weight_files", "checkpoint_files", "place_tensors", "read_index", "SAFETENSORS_INDEX", "SAFETENSORS_SINGLE", "BIN_INDEX", "BIN_SINGLE"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link is present (and refused later)


def read_index(index: Path, spec: str, fix: str = "re-download the model") -> dict[str, str]:
    """The `weight_map` of an index file (tensor -> file name), each file a plain name inside
    the checkpoint directory; `fix` ends the error messages."""
    regular_file(index, "index file")
    try:
        data = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise SourceError(f"'{index}' is not valid JSON ({err}); {fix}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SourceError(f"'{index}' has no 'weight_map' object of tensor names to file names; {fix}")
    for file in set(weight_map.values()):
        p = PurePosixPath(file)
        if not file or p.is_absolute() or ".." in p.parts or "\\" in file:
            raise SourceError(f"'{index}' names weight file '{file}', which lies outside the model directory; "
                              "only files inside it are read")
    return weight_map


def weight_files(path: Path, spec: str | None = None) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files transformers would load from directory `path`, and the index's
    weight map when there is one. Empty when the directory holds none."""
    spec = spec or str(path)
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = path / index_name
        if _present(index):
            weight_map = read_index(index, spec)
            return [path / f for f in sorted(set(weight_map.values()))], weight_map
        if _present(path / single):
            return [path / single], None
    return [], None


def checkpoint_files(path: Path, spec: str) -> tuple[list[Path], dict[str, str] | None]:
    """`weight_files` of `path`, refused when there are none or one that an index names is
    missing or not a regular file."""
    files, weight_map = weight_files(path, spec)
    if not files:
        stray = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (found {stray[0]}, which transformers would not load either)" if stray else ""
        raise SourceError(f"'{spec}' has no weights: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {BIN_SINGLE}{hint}")
    for f in files:
        if not _present(f):  # only an index can name a file that is not there
            index = SAFETENSORS_INDEX if f.name.endswith(".safetensors") else BIN_INDEX
            raise SourceError(f"'{spec}': shard '{f.name}' is listed in {index} but missing; re-download the model")
        regular_file(f, "weights file")
    return files, weight_map


def place_tensors(spec: str, weight_map: dict[str, str] | None, held: dict[str, Collection[str]]) -> dict[str, str]:
    """Tensor name -> the file that holds it: the index's weight map, each file checked to hold
    what it places there, else every tensor of the one file. `held`: file name -> its tensors."""
    names = weight_map or {name: file for file, tensors in held.items() for name in tensors}
    for name, file in names.items():
        if name not in held[file]:
            raise SourceError(f"'{spec}': the index places tensor '{name}' in '{file}', which does not hold it; "
                              "re-download the model")
    return names


class Checkpoint:
    """Tensor names, shapes and dtypes of a checkpoint directory; `read(name)` loads one."""

    def __init__(self, path: str | Path, spec: str | None = None):
        self.path = Path(path)
        spec = self.spec = spec or str(path)
        self._st: dict[str, SafetensorsFile] = {}
        self._bin: dict[str, torch.Tensor] = {}
        files, weight_map = checkpoint_files(self.path, spec)
        self.files = files
        if files[0].name.endswith(".safetensors"):
            from .safetensors_io import SafetensorsFile

            opened = {f.name: SafetensorsFile(f) for f in files}
            names = place_tensors(spec, weight_map, {file: sf.tensors for file, sf in opened.items()})
            self._st = {name: opened[file] for name, file in names.items()}
            return
        for f in files:
            self._bin.update(_load_bin(f))

    def __contains__(self, name: str) -> bool:
        return name in self._st or name in self._bin

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return [*self._st, *self._bin]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return self._st[name].tensors[name].shape if name in self._st else tuple(self._bin[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        """dtype of tensor `name`."""
        return self._st[name].tensors[name].dtype if name in self._st else self._bin[name].dtype

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor `name` in memory (only this one), or its rows `rows = (start, stop)` along
        the first dimension (reading only those, from safetensors)."""
        if name in self._st:
            return self._st[name].read(name, rows)
        t = self._bin[name]
        return (t if rows is None else t[rows[0]:rows[1]]).contiguous().clone()

    def check_shapes(self, model: torch.nn.Module, spec: str) -> None:
        """Refuse a checkpoint that lacks a tensor `model` (meta or real) needs or disagrees with
        it in shape, its names mapped as transformers maps them (see `TensorNames`)."""
        from .tensor_names import TensorNames

        TensorNames(self, model).check(spec)


def _load_bin(f: Path) -> dict[str, torch.Tensor]:
    import torch

    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise SourceError(f"cannot read '{f}' (UnpicklingError); the file is truncated or corrupt") from None
        why = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                   "it holds objects other than tensors")
        raise SourceError(f"'{f}': an unsafe pickle was refused: {why.rstrip('.')}; .bin files are loaded only with "
                          "torch.load(weights_only=True), which runs no code; convert it to safetensors where you trust it") from None
    except Exception as err:
        raise SourceError(f"cannot read '{f}' ({type(err).__name__}); the file is truncated or corrupt") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise SourceError(f"'{f}' is not a state dict of tensors; pass a checkpoint saved by save_pretrained")
    return state
