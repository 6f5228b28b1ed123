"""A source checkpoint directory read one tensor at a time (safetensors, or `.bin` via
`torch.load(weights_only=True, mmap=True)`), with its problems reported up front."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SourceError
from .safetensors_io import SafetensorsFile

__all__ = ["Checkpoint"]


class Checkpoint:
    """Tensor names, shapes and dtypes of a checkpoint directory; `read(name)` loads one."""

    def __init__(self, path: str | Path, spec: str | None = None):
        self.path = Path(path)
        spec = spec or str(path)
        self._st: dict[str, SafetensorsFile] = {}
        self._bin: dict[str, torch.Tensor] = {}
        files = sorted(self.path.glob("*.safetensors"))
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            listed = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            missing = [f for f in listed if not (self.path / f).is_file()]
            if missing:
                raise SourceError(f"'{spec}': shard '{missing[0]}' is listed in {index.name} but missing; re-download the model")
            files = [self.path / f for f in listed]
        if files:
            for f in files:
                sf = SafetensorsFile(f)
                for name in sf.tensors:
                    self._st[name] = sf
            return
        bins = sorted(self.path.glob("pytorch_model*.bin"))
        if not bins:
            raise SourceError(f"'{spec}' has no weights (*.safetensors or pytorch_model*.bin)")
        for f in bins:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:
                raise SourceError(f"cannot read '{f}' ({type(err).__name__}); the file is truncated or corrupt") from None
            self._bin.update(state)

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
        """Refuse a checkpoint whose tensors disagree in shape with `model` (meta or real)."""
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        prefix = getattr(model, "base_model_prefix", "") or ""
        for name in self.names():
            want = expected.get(name) or expected.get(name.removeprefix(f"{prefix}."))
            if want is not None and self.shape(name) != want:
                raise SourceError(
                    f"'{spec}': tensor '{name}' has shape {self.shape(name)} but config.json implies {want}; "
                    "the weights do not match config.json"
                )

    @property
    def files(self) -> list[Path]:
        """The weight files."""
        return sorted({sf.path for sf in self._st.values()}) if self._st else sorted(self.path.glob("pytorch_model*.bin"))
