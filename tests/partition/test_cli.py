"""`sparsify profile`, `partition` and `shard`: the artifacts, the report, and bad input."""

from __future__ import annotations

import json

import pytest

from sparsify.cli.main import main
from sparsify.formats.native import read_manifest
from sparsify.partition.placement import ExpertPlacement
from sparsify.partition.shards import read_shard_manifest
from sparsify.partition.stats import RoutingStats


@pytest.fixture(scope="module")
def artifacts(skewed_moe, tmp_path_factory):
    """stats.json, plan.json (4 ranks, from the stats) and shards/ of the skewed model."""
    d = tmp_path_factory.mktemp("artifacts")
    assert main(["profile", str(skewed_moe), "--demo-text", "--seq-len", "64", "-o", str(d / "stats.json")]) == 0
    assert main(["partition", str(skewed_moe), "-n", "4", "--stats", str(d / "stats.json"), "-o", str(d / "plan.json")]) == 0
    assert main(["shard", str(skewed_moe), "--plan", str(d / "plan.json"), "-o", str(d / "shards")]) == 0
    return d


def test_profile_counts_what_the_routers_chose(artifacts, skewed_moe):
    stats = RoutingStats.load(artifacts / "stats.json")
    plan = read_manifest(skewed_moe)["plan"]
    assert list(stats.layers) == plan["selected"] and stats.top_k == 2
    for s in stats.layers.values():
        assert s.tokens > 0 and sum(s.expert_tokens) == 2 * s.tokens
        assert s.expert_tokens[4:] == [0, 0, 0, 0]  # the skewed routers never choose 4..7
        assert all(s.coactivation[i][j] == s.coactivation[j][i] for i in range(8) for j in range(8))
    assert stats.calibration["source"] == "demo-text"


def test_partition_with_skewed_stats_beats_contiguous_and_reports_both(artifacts, skewed_moe, capsys):
    rep = ExpertPlacement.load(artifacts / "plan.json").report
    assert rep["imbalance"] < rep["contiguous_imbalance"]
    main(["partition", str(skewed_moe), "-n", "4", "--stats", str(artifacts / "stats.json"),
          "-o", str(artifacts / "again.json")])
    out = capsys.readouterr().out
    assert f"planned {rep['imbalance']:.3f}, contiguous {rep['contiguous_imbalance']:.3f}" in out
    assert "contiguous max/mean" in out and "a2a bytes/token" in out


def test_shards_hold_each_rank_its_experts(artifacts):
    info = read_shard_manifest(artifacts / "shards")
    placement = ExpertPlacement.load(artifacts / "plan.json")
    assert [r["file"] for r in info["ranks"]] == [f"rank-{r:05d}-of-00004.safetensors" for r in range(4)]
    for r, rank in enumerate(info["ranks"]):
        assert rank["experts"] == {p: placement.local_experts(p, r) for p in placement.layers}
        assert (artifacts / "shards" / rank["file"]).is_file()
    assert len({r["bytes"] for r in info["ranks"]}) == 1  # equal experts per rank: equal files


def _fails(capsys, *args: str, message: str) -> None:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_bad_input_is_one_line_and_writes_nothing(artifacts, skewed_moe, tmp_path, capsys):
    out = tmp_path / "out.json"
    moe = str(skewed_moe)
    _fails(capsys, "partition", moe, "-n", "3", "-o", str(out), message="--world-size 3 does not divide the 8 experts")
    _fails(capsys, "partition", moe, "-n", "2", "--memory-per-rank", "1MB", "-o", str(out), message="too small for any placement")
    _fails(capsys, "partition", moe, "-n", "2", "--memory-per-rank", "lots", "-o", str(out), message="takes a size like 80GB")
    _fails(capsys, "partition", "demo:t5", "-n", "2", "-o", str(out), message="not an upcycled model directory")
    _fails(capsys, "profile", "demo:t5", "--demo-text", "-o", str(out), message="has no MoE layer")
    _fails(capsys, "profile", moe, "-o", str(out), message="either --calibration FILE or --demo-text")

    stats = json.loads((artifacts / "stats.json").read_text())
    stats["layers"]["decoder.block.9.layer.2.DenseReluDense"] = stats["layers"].popitem()[1]
    (tmp_path / "other-stats.json").write_text(json.dumps(stats))
    _fails(capsys, "partition", moe, "-n", "2", "--stats", str(tmp_path / "other-stats.json"), "-o", str(out),
           message="made for another model")

    other = ExpertPlacement.contiguous(["model.layers.1.mlp", "model.layers.3.mlp"], 8, 2)
    other.save(tmp_path / "other-plan.json")
    _fails(capsys, "shard", moe, "--plan", str(tmp_path / "other-plan.json"), "-o", str(tmp_path / "shards"),
           message="which is not an MoE layer of the model")
    _fails(capsys, "shard", moe, "--plan", str(tmp_path / "missing.json"), "-o", str(tmp_path / "shards"),
           message="no such placement file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-plan.json", "other-stats.json"]


def test_calibration_file_and_existing_output(skewed_moe, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("the experts route every token; " * 40)
    out = tmp_path / "stats.json"
    assert main(["profile", str(skewed_moe), "--calibration", str(text), "--seq-len", "32", "-o", str(out)]) == 0
    assert RoutingStats.load(out).calibration["source"] == str(text)
    _fails(capsys, "profile", str(skewed_moe), "--demo-text", "-o", str(out), message="already exists")


def test_the_installed_command_exits_nonzero_without_traceback(skewed_moe, tmp_path, cli):
    result = cli("partition", str(skewed_moe), "--world-size", "3", "-o", str(tmp_path / "plan.json"))
    assert result.returncode != 0
    assert "does not divide" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "plan.json").exists()
