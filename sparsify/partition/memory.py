"""What a rank holds in memory: the replicated tensors plus its experts' weights.

The footprint is measured either on a module (any device, the meta device included) or on a
native checkpoint's safetensors headers, so planning never loads weights. It counts weights
and buffers only; optimizer state and activations come on top.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch.nn as nn

from ..errors import OptionError, SourceError
from ..units import format_bytes  # noqa: F401  (re-exported: the planner's messages use it)

__all__ = ["Footprint", "parse_memory", "format_bytes", "footprint_of_module", "footprint_of_checkpoint", "is_expert_tensor"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def parse_memory(text: str | int) -> int:
    """'80GB' -> 80e9 bytes, '512MiB' -> 512 * 2**20; a bare number is bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise OptionError(f"--memory-per-rank takes a size like 80GB, 24GiB or 512MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def is_expert_tensor(name: str, layers: Sequence[str]) -> str | None:
    """The MoE layer whose experts tensor `name` belongs to, else None."""
    for layer in layers:
        if name.startswith(f"{layer}.experts."):
            return layer
    return None


@dataclass
class Footprint:
    """Bytes every rank holds (`replicated_bytes`), bytes of one expert per layer, and the
    element size of the activations that travel in the all-to-all."""

    replicated_bytes: int
    expert_bytes: dict[str, int]
    element_size: int

    def rank_bytes(self, experts_per_layer: dict[str, int]) -> int:
        """Memory of a rank holding `experts_per_layer[layer]` experts of each layer."""
        return self.replicated_bytes + sum(self.expert_bytes[p] * n for p, n in experts_per_layer.items())


def footprint_of_module(model: nn.Module, layers: Sequence[str], num_experts: int) -> Footprint:
    """The footprint of an upcycled (unpartitioned) module; tied tensors count once."""
    replicated, experts = 0, {p: 0 for p in layers}
    element_size = 4
    seen = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = t.numel() * t.element_size()
        layer = is_expert_tensor(name, layers)
        if layer is None:
            replicated += size
        else:
            experts[layer] += size
            element_size = t.element_size()
    return Footprint(replicated, {p: b // num_experts for p, b in experts.items()}, element_size)


def footprint_of_checkpoint(path: Path, layers: Sequence[str], num_experts: int) -> Footprint:
    """The footprint of a native checkpoint, read from its safetensors headers only."""
    from safetensors import SafetensorError, safe_open

    try:
        weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        raise SourceError(f"'{path}' has no readable model.safetensors.index.json; the output is incomplete") from None
    replicated, experts = 0, {p: 0 for p in layers}
    element_size = 4
    for shard in sorted(set(weight_map.values())):
        try:
            with safe_open(path / shard, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype_bytes = _DTYPE_BYTES.get(sl.get_dtype(), 4)
                    size = dtype_bytes
                    for d in sl.get_shape():
                        size *= d
                    layer = is_expert_tensor(name, layers)
                    if layer is None:
                        replicated += size
                    else:
                        experts[layer] += size
                        element_size = dtype_bytes
        except (SafetensorError, OSError) as err:
            raise SourceError(f"cannot read '{path / shard}' ({err}); the file is missing, truncated or corrupt") from None
    return Footprint(replicated, {p: b // num_experts for p, b in experts.items()}, element_size)
