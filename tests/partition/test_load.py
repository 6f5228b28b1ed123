"""`sparsify.load(dir, placement=, group=)` and per-rank shards: each rank reads only its experts."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

import sparsify
from sparsify.cli.main import main
from sparsify.errors import OptionError, PlanError
from sparsify.partition.placement import ExpertPlacement
from sparsify.partition.reader import runs

from partition_workers import check_load, close, launch


@pytest.fixture(scope="module")
def two_ranks(skewed_moe, tmp_path_factory):
    """stats, an uneven 2-rank plan made from them, and its shards."""
    d = tmp_path_factory.mktemp("two-ranks")
    assert main(["profile", str(skewed_moe), "--demo-text", "--seq-len", "64", "-o", str(d / "stats.json")]) == 0
    assert main(["partition", str(skewed_moe), "-n", "2", "--uneven", "--stats", str(d / "stats.json"),
                 "-o", str(d / "plan.json")]) == 0
    assert main(["shard", str(skewed_moe), "--plan", str(d / "plan.json"), "-o", str(d / "shards")]) == 0
    return d


def _expert_tensors(moe_dir) -> dict[str, int]:
    """Stacked expert tensor name -> bytes of one expert's rows, from the safetensors headers."""
    out = {}
    for f in moe_dir.glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                if ".experts." in name:
                    shape = h.get_slice(name).get_shape()
                    out[name] = 4 * int(torch.tensor(shape[1:]).prod())
    return out


def test_each_rank_reads_only_its_experts_and_matches_one_process(skewed_moe, two_ranks, tmp_path):
    launch(check_load, 2, str(skewed_moe), str(two_ranks / "shards"), str(two_ranks / "plan.json"), str(tmp_path))
    placement = ExpertPlacement.load(two_ranks / "plan.json")
    sizes = _expert_tensors(skewed_moe)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for kind in ("native", "shards"):
            assert got[kind]["error"] <= 1e-5, f"rank {rank} from {kind}: outputs differ by {got[kind]['error']:.2e}"
        # From the whole checkpoint: exactly this rank's rows of each stacked expert tensor.
        reads: dict[str, list] = {}
        for name, start, stop, nbytes in got["native"]["expert_reads"]:
            reads.setdefault(name, []).append((start, stop))
            assert nbytes == (stop - start) * sizes[name]
        assert set(reads) == set(sizes)
        for name, ranges in reads.items():
            ids = placement.local_experts(name.rsplit(".experts.", 1)[0], rank)
            assert ranges == runs(ids)
        mine = sum(len(placement.local_experts(n.rsplit(".experts.", 1)[0], rank)) * b for n, b in sizes.items())
        assert sum(r[3] for r in got["native"]["expert_reads"]) == mine < 8 * sum(sizes.values())
        # From the shards: the replicated file and this rank's file, nothing else.
        assert got["shards"]["files"] == ["rank-%05d-of-00002.safetensors" % rank, "replicated.safetensors"]


@pytest.fixture
def world1(tmp_path):
    """A real one-rank gloo group in this process (enough to check errors without spawning)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_one_rank_holds_every_expert(skewed_moe, world1):
    from sparsify.capture import example_inputs_for
    from sparsify.verify import main_output

    from torch.distributed.device_mesh import init_device_mesh

    placement = ExpertPlacement.contiguous(sparsify.load(skewed_moe).sparsify_plan.selected, 8, 1)
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
    model = sparsify.load(skewed_moe, placement=placement.to_dict(), group=mesh["ep"])
    single = sparsify.load(skewed_moe)
    batch = example_inputs_for(single, 2, 8, seed=3)
    with torch.no_grad():
        assert close(main_output(model(**batch)), main_output(single(**batch))) <= 1e-5


def test_load_refuses_what_does_not_fit(skewed_moe, two_ranks, world1):
    with pytest.raises(OptionError, match="pass placement="):
        sparsify.load(skewed_moe, group=world1)
    with pytest.raises(PlanError, match="for 2 ranks but the process group has 1"):
        sparsify.load(skewed_moe, placement=two_ranks / "plan.json", group=world1)
    with pytest.raises(PlanError, match="for 2 ranks but the process group has 1"):
        sparsify.load(two_ranks / "shards", group=world1)
    other = ExpertPlacement.contiguous(["model.layers.1.mlp"], 8, 1)
    with pytest.raises(PlanError, match="'model.layers.1.mlp', which is not an MoE layer"):
        sparsify.load(skewed_moe, placement=other, group=world1)
    with pytest.raises(PlanError, match="cut for another placement"):
        sparsify.load(two_ranks / "shards", placement=other, group=world1)
