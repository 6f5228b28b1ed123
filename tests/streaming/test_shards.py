"""`sparsify shard` streams row ranges into the rank files: the files are what safetensors'
own `save_file` writes for the same tensors, and each rank of a real gloo group loads its own."""

from __future__ import annotations

import json
import struct

import pytest
from safetensors.torch import load_file, save_file

from sparsify.cli.main import main
from sparsify.partition.placement import ExpertPlacement
from sparsify.partition.shards import REPLICATED, rank_file

from .conftest import NATIVE_CASES, case_id


def _header(raw: bytes) -> tuple[int, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8:8 + n]


def _with_sorted_metadata(raw: bytes) -> bytes:
    """`raw` (a safetensors file) with its header's metadata keys sorted, nothing else changed:
    the library writes them in hash order, which differs from run to run."""
    n, header = _header(raw)
    metadata = json.loads(header).get("__metadata__", {})
    theirs = json.loads(header, object_pairs_hook=list)
    order = dict(next(v for k, v in theirs if k == "__metadata__"))
    old = json.dumps({"__metadata__": order}, separators=(",", ":"))[1:-1].encode()
    new = json.dumps({"__metadata__": dict(sorted(metadata.items()))}, separators=(",", ":"))[1:-1].encode()
    assert header.count(old) == 1, header[:200]
    return raw[:8] + header.replace(old, new) + raw[8 + n:]


@pytest.fixture(scope="module")
def sharded(upcycled, tmp_path_factory):
    """`sharded(case)` -> (output, plan.json, shards dir) for 2 ranks, contiguous placement."""
    made = {}

    def make(case):
        if case not in made:
            d = tmp_path_factory.mktemp("shards")
            out = upcycled(*case)
            assert main(["partition", str(out), "-n", "2", "-o", str(d / "plan.json"), "-q"]) == 0
            assert main(["shard", str(out), "--plan", str(d / "plan.json"), "-o", str(d / "shards"), "-q"]) == 0
            made[case] = (out, d / "plan.json", d / "shards")
        return made[case]

    return make


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_shard_files_are_what_save_file_writes(sharded, case, tmp_path):
    out, plan, shards = sharded(case)
    placement = ExpertPlacement.load(plan)
    names = [REPLICATED] + [rank_file(r, 2) for r in range(placement.world_size)]
    assert sorted(p.name for p in shards.glob("*.safetensors")) == sorted(names)
    for name in names:
        ours = (shards / name).read_bytes()
        tensors = load_file(shards / name)
        metadata = json.loads(_header(ours)[1])["__metadata__"]
        save_file(tensors, tmp_path / name, metadata=metadata)
        theirs = (tmp_path / name).read_bytes()
        if len(metadata) == 1:  # {"format": "pt"}: nothing to order, the very same bytes
            assert ours == theirs, name
        else:
            assert ours == _with_sorted_metadata(theirs), name
    # each rank's file holds exactly its experts' rows of every stacked expert tensor
    whole = {}
    for f in out.glob("*.safetensors"):
        whole.update(load_file(f))
    for rank in range(2):
        mine = load_file(shards / rank_file(rank, 2))
        assert mine
        for tensor_name, value in mine.items():
            layer = next(p for p in placement.layers if tensor_name.startswith(p + "."))
            experts = placement.local_experts(layer, rank)
            assert value.equal(whole[tensor_name][experts]), tensor_name


@pytest.mark.parametrize("case", [("llama", "native", "shared-0.25")], ids=case_id)
def test_each_rank_of_a_gloo_group_loads_its_shards(sharded, case, tmp_path):
    from partition_workers import check_load, launch

    out, plan, shards = sharded(case)
    launch(check_load, 2, str(out), str(shards), str(plan), str(tmp_path))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for kind in ("native", "shards"):
            assert got[kind]["error"] <= 1e-5, f"rank {rank} from {kind}: outputs differ by {got[kind]['error']:.2e}"
        assert got["shards"]["files"] == [rank_file(rank, 2), REPLICATED]
