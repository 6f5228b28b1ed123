"""An upcycled output as stored: its manifest, plan, format name and tensor headers, read
without torch or transformers.

What `sparsify inspect` reports of an output (the plan's sites, the parameter counts) needs no
model; importing torch and transformers would cost it seconds. `UpcycledOutput`
(`sparsify.streaming.output`) is the same directory opened to build and stream the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io.headers import DTYPE_NAMES, TensorHeader, read_headers
from ..plan import UpcyclePlan
from .layout_digest import as_written
from .manifest import MANIFEST, NATIVE_FORMAT, plan_of, read_output_manifest

__all__ = ["StoredOutput"]


@dataclass
class StoredOutput:
    """A directory written by `sparsify upcycle` / `sparsify.save`, in any format, by its files."""

    path: Path
    manifest: dict[str, Any]
    plan: UpcyclePlan
    format: str  # as sparsify.json names it ("sparsify-native", "mixtral", ...)
    headers: dict[str, TensorHeader]

    @classmethod
    def open(cls, path: str | Path) -> "StoredOutput":
        """Read the manifest (validated, every file's size checked), the plan and the tensor
        headers of `path`; each kind of damage is a one-line `SourceError`."""
        path = Path(path)
        manifest = read_output_manifest(path)
        plan = plan_of(manifest, path / MANIFEST)
        headers = read_headers(path, str(path))
        if headers is None:  # .bin weights, which sparsify never writes: torch reads their headers
            from ..io.checkpoint import Checkpoint

            ckpt, codes = Checkpoint(path, str(path)), {name: code for code, name in DTYPE_NAMES.items()}
            headers = {}
            for n in ckpt.names():
                dtype = str(ckpt.dtype(n)).removeprefix("torch.")
                headers[n] = TensorHeader(codes.get(dtype, dtype), tuple(ckpt.shape(n)))
        return cls(path, manifest, plan, manifest["format"], headers)

    @property
    def native(self) -> bool:
        """True for sparsify's native format."""
        return self.format == NATIVE_FORMAT

    @property
    def parameters(self) -> int:
        """The converted model's parameter count: every stored tensor is a parameter (the
        architectures sparsify converts keep no persistent buffers), tied tensors stored once."""
        return sum(math.prod(h.shape) for h in self.headers.values())

    def check_fits(self) -> None:
        """For a native output: refuse one whose tensors do not fit its plan. One that records
        the layout digest of its plan and headers is as written (and fits); any other is checked
        by building the plan's model (`UpcycledOutput.check_fits`: torch and transformers)."""
        if not self.native or as_written(self.manifest, self.headers):
            return
        from ..streaming.output import UpcycledOutput

        UpcycledOutput.open(self.path).check_fits()
