"""What the commands print: units, wording, --quiet, --json (the figures the text shows), --dry-run."""

from __future__ import annotations

import json
import re

import pytest

from sparsify.units import format_bytes, format_count


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """demo:t5 upcycled to 4 experts (native format), written by the CLI."""
    from sparsify.cli.main import main

    out = tmp_path_factory.mktemp("moe") / "t5-moe"
    assert main(["upcycle", "demo:t5", "-e", "4", "--noise", "0.05", "-o", str(out), "-q"]) == 0
    return out


def _json(sparsify_cli, *args, code=0):
    got, out, err = sparsify_cli(*args, "--json")
    assert got == code, err
    return json.loads(out)  # the whole of stdout is one document


def test_upcycle_summary_units_wording_and_json(tmp_path, sparsify_cli):
    code, text, err = sparsify_cli("upcycle", "demo:t5", "-e", "8", "-o", tmp_path / "a")
    assert code == 0 and not err
    doc = _json(sparsify_cli, "upcycle", "demo:t5", "-e", "8", "-o", tmp_path / "b")
    assert doc["bytes_written"] == sum(f.stat().st_size for f in (tmp_path / "b").iterdir())
    assert doc["weight_bytes"] < sum(f.stat().st_size for f in (tmp_path / "b").glob("*.safetensors"))
    p = doc["parameters"]
    assert f"{format_bytes(doc['bytes_written'])} written" in text and re.search(r"\d\.\d\d [KMG]B written", text)
    assert not re.search(r"\d[KMGT]?BB|\d(KB|MB|GB)\b", text)  # "7.91BB", "2.24MB"
    assert f"{format_count(p['total'])} total, {format_count(p['active_per_token'])} active per token" in text
    assert f"(dense: {format_count(p['dense'])})" in text
    # "4 -> 8 experts" read as "4 experts become 8"
    assert "converted 4 of the 8 FFNs into MoE layers of 8 experts each (topk router, top-2)" in text
    assert doc["selected"] == [r["module"] for r in doc["sites"] if r["layer"] == "MoE"] and len(doc["selected"]) == 4
    assert doc["moe"]["num_experts"] == 8 and doc["preserves_outputs"] is True
    # one short line on the format; the reasoning only with --verbose
    format_lines = [line for line in text.splitlines() if "format" in line]
    assert len(format_lines) == 1 and "native (no Hugging Face format fits" in format_lines[0]
    assert "mixtral:" not in text and doc["format_reason"].count(":") >= 3
    code, verbose, _ = sparsify_cli("upcycle", "demo:t5", "-e", "8", "-o", tmp_path / "c", "--verbose")
    assert code == 0 and doc["format_reason"] in verbose


def test_quiet_prints_only_the_result_line(tmp_path, sparsify_cli):
    code, out, err = sparsify_cli("upcycle", "demo:llama", "-e", "4", "-o", tmp_path / "q", "--quiet")
    assert code == 0 and out == f"upcycled demo:llama -> {tmp_path / 'q'}\n" and err == ""
    code, out, err = sparsify_cli("verify", "demo:llama", tmp_path / "q", "-q")
    assert code == 0 and out == "match\n" and err == ""
    code, out, err = sparsify_cli("inspect", tmp_path / "q", "-q")
    assert code == 0 and out.count("\n") == 1 and "2 of 4 FFNs are MoE layers" in out


@pytest.mark.parametrize("source", ["demo:t5", "checkpoint"])
def test_dry_run_shows_the_plan_and_writes_nothing(tmp_path, sparsify_cli, demo, source):
    if source == "checkpoint":
        demo("llama").save_pretrained(tmp_path / "dense")
        source = str(tmp_path / "dense")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, text, _ = sparsify_cli("upcycle", source, "-e", "4", "-o", tmp_path / "out", "--dry-run")
    dry = _json(sparsify_cli, "upcycle", source, "-e", "4", "-o", tmp_path / "out", "--dry-run")
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporaries
    assert text.startswith(f"dry run (nothing written): {source} -> ") and "would be written" in text
    for row in dry["sites"]:
        assert row["module"] in text
    assert text.count("MoE: 4 experts") == len(dry["selected"]) > 0
    assert f"{format_bytes(dry['weight_bytes'])} of weights would be written" in text and dry["bytes_written"] is None
    real = _json(sparsify_cli, "upcycle", source, "-e", "4", "-o", tmp_path / "out")
    assert dry["dry_run"] and not real["dry_run"]
    assert real["weight_bytes"] < real["bytes_written"] < real["weight_bytes"] + 100_000  # headers, config, plan
    for key in ("weight_bytes", "parameters", "selected", "sites", "format", "moe", "streamed"):
        assert dry[key] == real[key], key


def test_inspect_rows_say_what_each_site_is(moe_dir, sparsify_cli):
    code, text, _ = sparsify_cli("inspect", moe_dir)
    doc = _json(sparsify_cli, "inspect", moe_dir)
    assert code == 0 and doc["kind"] == "upcycled" and doc["format"] == "native"
    moe_rows = [r for r in doc["sites"] if r["layer"] == "MoE"]
    assert [r["module"] for r in moe_rows] == doc["selected"] and len(moe_rows) == 4
    for line in text.splitlines():
        if any(r["module"] in line for r in moe_rows):
            assert "MoE: 4 experts, each an FFN" in line and "topk router, top-2" in line and "dense" not in line
    p = doc["parameters"]
    assert f"parameters: {format_count(p['total'])} total, {format_count(p['active_per_token'])} active per token" in text
    dense = _json(sparsify_cli, "inspect", "demo:t5")
    assert dense["kind"] == "dense" and dense["selected"] == [] and {r["layer"] for r in dense["sites"]} == {"FFN"}
    assert dense["parameters"]["dense"] == p["dense"]  # the upcycled model's dense part is the source


def test_verify_json_holds_the_printed_figures(moe_dir, sparsify_cli):
    code, text, _ = sparsify_cli("verify", "demo:t5", moe_dir)
    doc = _json(sparsify_cli, "verify", "demo:t5", moe_dir, code=1)
    assert code == 1 and doc["match"] is False  # --noise 0.05: the experts differ from the FFN
    assert f"max abs diff {doc['max_abs']:.3e}" in text and f"(tolerance {doc['tolerance']:.3e})" in text
    assert "MISMATCH" in text
    doc = _json(sparsify_cli, "verify", "demo:t5", moe_dir, "--atol", "1e3")
    assert doc["match"] is True and doc["tolerance"] == 1e3


def test_profile_partition_shard_json(moe_dir, tmp_path, sparsify_cli):
    code, text, _ = sparsify_cli("profile", moe_dir, "--demo-text", "--seq-len", "32", "-o", tmp_path / "s1.json")
    doc = _json(sparsify_cli, "profile", moe_dir, "--demo-text", "--seq-len", "32", "-o", tmp_path / "s2.json")
    assert code == 0 and set(doc["layers"]) == set(json.loads((tmp_path / "s2.json").read_text())["layers"])
    for path, layer in doc["layers"].items():
        row = next(line for line in text.splitlines() if path in line)
        assert str(layer["tokens"]) in row and f"{layer['max_over_mean']:.2f}" in row
    args = ["partition", moe_dir, "-n", "2", "--stats", tmp_path / "s2.json"]
    code, text, _ = sparsify_cli(*args, "-o", tmp_path / "p1.json")
    doc = _json(sparsify_cli, *args, "-o", tmp_path / "p2.json")
    rep = doc["report"]
    assert code == 0 and f"planned {rep['imbalance']:.3f}, contiguous {rep['contiguous_imbalance']:.3f}" in text
    assert f"({format_bytes(rep['replicated_bytes'])} replicated)" in text
    code, text, _ = sparsify_cli("shard", moe_dir, "--plan", tmp_path / "p2.json", "-o", tmp_path / "sh1")
    doc = _json(sparsify_cli, "shard", moe_dir, "--plan", tmp_path / "p2.json", "-o", tmp_path / "sh2")
    assert code == 0 and len(doc["ranks"]) == 2
    for rank in doc["ranks"]:
        assert f"{rank['file']}: {format_bytes(rank['bytes'])} of experts" in text
        assert (tmp_path / "sh2" / rank["file"]).stat().st_size >= rank["bytes"]
    assert f"{format_bytes(doc['replicated']['bytes'])} (every rank)" in text


@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (2_240_000, "2.24 MB"), (7.91e9, "7.91 GB"),
                                     (1.5e13, "15.00 TB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("n, text", [(0, "0"), (560_123, "560K"), (1_234_567, "1.23M"), (7.24e9, "7.24B")])
def test_format_count(n, text):
    assert format_count(n) == text


def test_free_space_error_uses_the_bytes_helper(tmp_path):
    from sparsify.errors import OutputError
    from sparsify.io.atomic import check_space

    with pytest.raises(OutputError, match=r"needs \d+\.\d\d [KMGT]B and \d+(\.\d\d)? [KMGT]?B are free"):
        check_space(tmp_path / "out", 1 << 60)
