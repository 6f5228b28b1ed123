"""Per-rank checkpoints for expert-parallel jobs (`sparsify shard`).

    OUT/shards.json                       format, the native manifest (plan, aliases, buffers),
                                          the placement, and which file holds what
    OUT/config.json                       the source model's config
    OUT/replicated.safetensors            every tensor that is not an expert (each rank loads it)
    OUT/rank-0000r-of-0000n.safetensors   rank r's experts: for each MoE layer and weight role,
                                          its experts stacked in ascending expert order
    OUT/tokenizer files                   copied when the model has them

A rank opens the replicated file and its own file only, never another rank's. The writer
streams: each file is written as its tensors are read from the native checkpoint, a range of
rows at a time (a rank's experts are row ranges of the stacked expert tensors), with the
project's streaming safetensors writer, so memory stays at a few buffers whatever the size.
The files are byte for byte what `safetensors.torch.save_file` writes for the same tensors,
but for the order of the header's metadata keys: the library writes them in hash order, which
changes from run to run; here they are sorted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import SourceError
from ..formats.base import tokenizer_files
from ..formats.manifest import plan_of
from ..formats.native import INDEX, read_manifest
from ..io.atomic import atomic_directory, check_output, check_space
from ..io.checkpoint import Checkpoint, read_index
from ..io.integrity import OutputFiles, check_files, files_of
from ..io.safetensors_io import OutputTensor, library_order, write_file
from .memory import is_expert_tensor
from .jsonfile import read_json
from .placement import ExpertPlacement
from .reader import runs

__all__ = ["write_shards", "read_shard_manifest", "is_shard_dir", "rank_file", "SHARDS_MANIFEST", "REPLICATED"]

SHARDS_MANIFEST = "shards.json"
SHARDS_FORMAT = "sparsify-shards"
REPLICATED = "replicated.safetensors"
_CHUNK = 64 << 20  # bytes read at a time


def rank_file(rank: int, world_size: int) -> str:
    """The name of rank `rank`'s expert file."""
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def is_shard_dir(path: str | Path) -> bool:
    """True when `path` is a directory written by `write_shards`."""
    return (Path(path) / SHARDS_MANIFEST).is_file()


def read_shard_manifest(path: str | Path) -> dict[str, Any]:
    """The `shards.json` of a shards directory."""
    path = Path(path)
    where = path / SHARDS_MANIFEST
    data = read_json(where, f"'{path}' has no {SHARDS_MANIFEST}; it is not written by sparsify shard",
                     "the output is damaged")
    if not isinstance(data, dict) or data.get("format") != SHARDS_FORMAT:
        raise SourceError(f"'{where}' is not a sparsify shards manifest")
    ranks = data.get("ranks")
    if not (isinstance(data.get("manifest"), dict) and isinstance(data["manifest"].get("plan"), dict)
            and isinstance(data.get("replicated"), str) and isinstance(data.get("placement"), dict)
            and isinstance(ranks, list) and all(isinstance(r, dict) and isinstance(r.get("file"), str) for r in ranks)):
        raise SourceError(f"'{where}' is damaged (a manifest, plan, placement or rank entry is missing); write the shards again")
    check_files(path, files_of(data, str(where)), SHARDS_MANIFEST)
    return data


def native_weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file of a native checkpoint."""
    index = path / INDEX
    if not (index.exists() or index.is_symlink()):
        raise SourceError(f"'{path}' has no {INDEX}; the output is incomplete")
    return read_index(index, str(path), fix="write the model again")


def _rows(ckpt: Checkpoint, name: str, ranges: Sequence[tuple[int, int]] | None) -> Iterator[torch.Tensor]:
    """The rows `ranges` of tensor `name` (None: all of it), read at most `_CHUNK` bytes at a time."""
    shape = tuple(ckpt.shape(name))
    if not shape:
        yield ckpt.read(name)
        return
    row = max(1, math.prod(shape[1:]) * torch.empty((), dtype=ckpt.dtype(name)).element_size())
    step = max(1, _CHUNK // row)
    for a, b in ranges if ranges is not None else [(0, shape[0])]:
        for start in range(a, b, step):
            yield ckpt.read(name, (start, min(b, start + step)))


def _tensor(ckpt: Checkpoint, name: str, experts: Sequence[int] | None = None) -> OutputTensor:
    """Tensor `name` of the checkpoint (or rows `experts` of it), to be read when written."""
    shape = tuple(ckpt.shape(name))
    if experts is None:
        return OutputTensor(name, ckpt.dtype(name), shape, lambda: _rows(ckpt, name, None))
    if not shape or any(not 0 <= e < shape[0] for e in experts):
        raise SourceError(f"'{ckpt.path}': tensor '{name}' of shape {shape} has no experts {list(experts)}; "
                          "the placement does not fit the checkpoint")
    return OutputTensor(name, ckpt.dtype(name), (len(experts), *shape[1:]), lambda: _rows(ckpt, name, runs(experts)))


def write_shards(model_dir: str | Path, placement: ExpertPlacement | str | dict, out: str | Path, force: bool = False) -> Path:
    """Cut the native checkpoint `model_dir` into per-rank files by `placement` (atomically,
    streaming; `shards.json` lists the size and sha256 of every file written)."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)  # also checks the sizes of its files
    plan = plan_of(manifest, model_dir / "sparsify.json")
    sources = [model_dir, placement if isinstance(placement, (str, Path)) else None]
    placement = ExpertPlacement.load(placement)
    placement.check_matches(plan)
    check_output(out, force, sources, kind="dir")
    weight_map = native_weight_map(model_dir)
    ckpt = Checkpoint(model_dir, str(model_dir))
    layers = list(placement.layers)
    n = placement.world_size
    tokenizer = tokenizer_files(model_dir)
    weights = sum((model_dir / f).stat().st_size for f in set(weight_map.values()))
    check_space(out, weights + sum(f.stat().st_size for f in tokenizer) + (1 << 20))
    ranks_info = []
    with atomic_directory(out, force=force, sources=sources) as tmp:
        files = OutputFiles(tmp)
        files.copy(model_dir / "config.json", "config.json")
        for f in tokenizer:
            files.copy(f, f.name)
        replicated = [_tensor(ckpt, k) for k in weight_map if is_expert_tensor(k, layers) is None]
        write_file(files, REPLICATED, library_order(replicated))
        for rank in range(n):
            owned = {p: placement.local_experts(p, rank) for p in layers}
            tensors = [_tensor(ckpt, k, owned[layer]) for k in weight_map
                       if (layer := is_expert_tensor(k, layers)) is not None]
            meta = {"rank": str(rank), "world_size": str(n), "experts": json.dumps(owned)}
            write_file(files, rank_file(rank, n), library_order(tensors), metadata=meta)
            ranks_info.append({"file": rank_file(rank, n), "experts": owned, "bytes": sum(t.nbytes for t in tensors)})
        data = {
            "format": SHARDS_FORMAT,
            "version": 1,
            "replicated": REPLICATED,
            "ranks": ranks_info,
            "placement": placement.to_dict(),
            "manifest": {k: v for k, v in manifest.items() if k != "files"},  # those files are not here
            "files": files.to_dict(),
        }
        (tmp / SHARDS_MANIFEST).write_text(json.dumps(data, indent=2))
    return Path(out)
