"""Per-rank checkpoints for expert-parallel jobs (`sparsify shard`).

    OUT/shards.json                       format, the native manifest (plan, aliases, buffers),
                                          the placement, and which file holds what
    OUT/config.json                       the source model's config
    OUT/replicated.safetensors            every tensor that is not an expert (each rank loads it)
    OUT/rank-0000r-of-0000n.safetensors   rank r's experts: for each MoE layer and weight role,
                                          its experts stacked in ascending expert order
    OUT/tokenizer files                   copied when the model has them

A rank opens the replicated file and its own file only, never another rank's. The experts
are read from the native checkpoint one rank at a time, so the writer's memory peaks at the
replicated tensors plus one rank's experts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..errors import SourceError
from ..formats.native import INDEX, read_manifest
from ..io.atomic import atomic_directory, check_output
from ..io.sources import TOKENIZER_FILES
from ..plan import UpcyclePlan
from .memory import is_expert_tensor
from .jsonfile import read_json
from .placement import ExpertPlacement
from .reader import CheckpointReader

__all__ = ["write_shards", "read_shard_manifest", "is_shard_dir", "rank_file", "SHARDS_MANIFEST", "REPLICATED"]

SHARDS_MANIFEST = "shards.json"
SHARDS_FORMAT = "sparsify-shards"
REPLICATED = "replicated.safetensors"


def rank_file(rank: int, world_size: int) -> str:
    """The name of rank `rank`'s expert file."""
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def is_shard_dir(path: str | Path) -> bool:
    """True when `path` is a directory written by `write_shards`."""
    return (Path(path) / SHARDS_MANIFEST).is_file()


def read_shard_manifest(path: str | Path) -> dict[str, Any]:
    """The `shards.json` of a shards directory."""
    path = Path(path)
    data = read_json(path / SHARDS_MANIFEST, f"'{path}' has no {SHARDS_MANIFEST}; it is not written by sparsify shard",
                     "the output is damaged")
    if not isinstance(data, dict) or data.get("format") != SHARDS_FORMAT:
        raise SourceError(f"'{path / SHARDS_MANIFEST}' is not a sparsify shards manifest")
    return data


def native_weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file of a native checkpoint."""
    try:
        return json.loads((path / INDEX).read_text())["weight_map"]
    except FileNotFoundError:
        raise SourceError(f"'{path}' has no {INDEX}; the output is incomplete") from None
    except (json.JSONDecodeError, KeyError):
        raise SourceError(f"'{path / INDEX}' is damaged; write the model again") from None


def write_shards(model_dir: str | Path, placement: ExpertPlacement | str | dict, out: str | Path, force: bool = False) -> Path:
    """Cut the native checkpoint `model_dir` into per-rank files by `placement` (atomically)."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    plan = UpcyclePlan.from_dict(manifest["plan"])
    placement = ExpertPlacement.load(placement)
    placement.check_matches(plan)
    check_output(out, force)
    weight_map = native_weight_map(model_dir)
    layers = list(placement.layers)
    n = placement.world_size
    ranks_info = []
    with atomic_directory(out, force=force) as tmp, CheckpointReader(model_dir) as reader:
        shutil.copy2(model_dir / "config.json", tmp / "config.json")
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, tmp / name)
        replicated = {k: reader.tensor(f, k) for k, f in weight_map.items() if is_expert_tensor(k, layers) is None}
        save_file(replicated, tmp / REPLICATED, metadata={"format": "pt"})
        del replicated
        for rank in range(n):
            owned = {p: placement.local_experts(p, rank) for p in layers}
            tensors = {k: reader.experts(f, k, owned[layer]) for k, f in weight_map.items()
                       if (layer := is_expert_tensor(k, layers)) is not None}
            meta = {"format": "pt", "rank": str(rank), "world_size": str(n), "experts": json.dumps(owned)}
            save_file(tensors, tmp / rank_file(rank, n), metadata=meta)
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            ranks_info.append({"file": rank_file(rank, n), "experts": owned, "bytes": size})
            del tensors
        data = {
            "format": SHARDS_FORMAT,
            "version": 1,
            "replicated": REPLICATED,
            "ranks": ranks_info,
            "placement": placement.to_dict(),
            "manifest": manifest,
        }
        (tmp / SHARDS_MANIFEST).write_text(json.dumps(data, indent=2))
    return Path(out)
