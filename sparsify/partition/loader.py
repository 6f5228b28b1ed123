"""`sparsify.load(dir, placement=..., group=...)`: each rank loads the model with only its experts.

The architecture is built on the meta device, the plan applied, each MoE layer replaced by an
`ExpertParallelMoE` holding this rank's experts, and the tensors assigned. From a native
checkpoint a rank reads its experts' rows of each stacked tensor (`get_slice`); from a shards
directory it opens the replicated file and its own file only. `model.sparsify_read_log` lists
every read, so anyone can check that no other rank's expert bytes were touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import OptionError, PlanError, SourceError
from ..formats.native import assign_tensors, read_manifest
from ..io.skeleton import build_skeleton
from ..plan import UpcyclePlan
from ..rewrite import apply_plan
from .expert_parallel import replace_moe_layers, resolve_group
from .memory import is_expert_tensor
from .placement import ExpertPlacement
from .reader import CheckpointReader
from .shards import is_shard_dir, native_weight_map, read_shard_manifest

__all__ = ["load_expert_parallel"]


def _placement_for(path: Path, placement: Any) -> tuple[dict[str, Any], ExpertPlacement, dict[str, Any] | None]:
    """(native manifest, placement, shards manifest or None) of `path`."""
    if is_shard_dir(path):
        shards = read_shard_manifest(path)
        stored = ExpertPlacement.from_dict(shards["placement"], where=f"the placement in '{path}'")
        if placement is None:
            return shards["manifest"], stored, shards
        given = ExpertPlacement.load(placement)
        if given.layers != stored.layers or given.world_size != stored.world_size:
            raise PlanError(f"'{path}' was cut for another placement than the one given; "
                            "run sparsify shard again with this plan, or pass placement=None")
        return shards["manifest"], stored, shards
    manifest = read_manifest(path)
    if placement is None:
        raise OptionError(f"'{path}' is a whole checkpoint; pass placement= (a plan.json from sparsify partition) "
                          "to load it expert-parallel, or drop group=")
    return manifest, ExpertPlacement.load(placement), None


def _skeleton(path: Path, plan: UpcyclePlan) -> nn.Module:
    from ..formats.native import read_config

    config = read_config(path)
    return apply_plan(build_skeleton(config), plan, copy_weights=False)


def _read(path: Path, reader: CheckpointReader, placement: ExpertPlacement, rank: int, shards: dict | None) -> dict[str, torch.Tensor]:
    layers = list(placement.layers)
    if shards is not None:
        mine = shards["ranks"][rank]["file"]
        files = [shards["replicated"], mine]
        return {k: reader.tensor(f, k) for f in files for k in reader.keys(f)}
    owned = {p: placement.local_experts(p, rank) for p in layers}
    tensors = {}
    for name, file in native_weight_map(path).items():
        layer = is_expert_tensor(name, layers)
        tensors[name] = reader.tensor(file, name) if layer is None else reader.experts(file, name, owned[layer])
    return tensors


def load_expert_parallel(path: str | Path, placement: Any = None, group: Any = None) -> nn.Module:
    """This rank's expert-parallel model from a native checkpoint (`placement` required: a
    plan.json path, its dict, or an `ExpertPlacement`) or a shards directory (its placement
    unless one is given, which must be the same). `group`: a process group or 1-D DeviceMesh
    (default: the world). The model is on the CPU; move it with `.to(device)`."""
    path = Path(path)
    if not path.is_dir():
        raise SourceError(f"no such model directory: '{path}'")
    pg = resolve_group(group)
    rank, n = dist.get_rank(pg), dist.get_world_size(pg)
    manifest, placement, shards = _placement_for(path, placement)
    plan = UpcyclePlan.from_dict(manifest["plan"])
    placement.check_matches(plan, n)
    model = replace_moe_layers(_skeleton(path, plan), placement, pg, copy_weights=False)
    with CheckpointReader(path) as reader:
        tensors = _read(path, reader, placement, rank, shards)
        assign_tensors(model, tensors, manifest, path)
    model.eval()
    model.sparsify_plan = plan
    model.sparsify_source = manifest.get("source", {})
    model.sparsify_read_log = reader.log
    return model
