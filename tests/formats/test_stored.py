"""An output as stored: `sparsify inspect` reads its manifest, plan and tensor headers without
torch or transformers; a native output's layout digest stands in for building its model, and
one without it (or with another) is checked by building the model, as before.

Imports are measured robustly, not by the clock: `python -X importtime` lists every module the
process imported."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparsify.formats.layout_digest import LAYOUT_KEY, as_written, layout_sha256
from sparsify.formats.manifest import NATIVE_FORMAT, STORED_FORMATS
from sparsify.formats.stored import StoredOutput
from sparsify.io.headers import read_headers
from tests.io.promises import assert_one_line_failure

# name -> upcycle arguments: every format, sharded (an index and several files)
WRITERS = {
    "native": ["demo:t5", "-f", "native"],
    "switch": ["demo:t5", "-f", "switch", "--router", "switch"],
    "mixtral": ["demo:llama", "-f", "mixtral", "--every", "1"],
    "qwen2-moe": ["demo:qwen2", "-f", "qwen2-moe", "--every", "1"],
}
HEAVY = ("torch", "transformers")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    from sparsify.cli.main import main

    root = tmp_path_factory.mktemp("stored")
    for name, args in WRITERS.items():
        assert main(["upcycle", *args, "-e", "4", "--shard-size", "300KB", "-o", str(root / name), "-q"]) == 0
    return root


@pytest.fixture
def copy(outputs, tmp_path):
    def get(name: str, edit=None) -> Path:
        out = tmp_path / f"{name}-copy"
        shutil.copytree(outputs / name, out)
        if edit is not None:
            manifest = json.loads((out / "sparsify.json").read_text())
            edit(out, manifest)
            (out / "sparsify.json").write_text(json.dumps(manifest, indent=2))
        return out
    return get


def _inspect_process(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`sparsify inspect OUT ARGS` in a fresh interpreter, and the top-level modules it imported."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "sparsify", "inspect", str(out), *args],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in r.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sparsify" in imported  # the measurement sees our own imports
    return r, imported


def test_stored_formats_are_the_registry_s():
    from sparsify.formats.native import FORMAT_NAME
    from sparsify.formats.registry import FORMATS

    assert sorted(STORED_FORMATS) == sorted(f.name for f in FORMATS.values())
    assert NATIVE_FORMAT == FORMAT_NAME


@pytest.mark.parametrize("name", list(WRITERS))
def test_headers_are_the_checkpoint_s(outputs, name):
    from sparsify.io.checkpoint import Checkpoint
    from sparsify.io.safetensors_io import DTYPES

    out = outputs / name
    ckpt = Checkpoint(out)
    codes = {dtype: code for code, dtype in DTYPES.items()}
    headers = read_headers(out)
    assert {n: (h.dtype, h.shape) for n, h in headers.items()} == {n: (codes[ckpt.dtype(n)], tuple(ckpt.shape(n)))
                                                                   for n in ckpt.names()}
    assert len(ckpt.files) >= 2
    stored = StoredOutput.open(out)
    assert stored.parameters == sum(ckpt.read(n).numel() for n in ckpt.names())
    assert stored.native == (name == "native")


@pytest.mark.parametrize("name", list(WRITERS))
def test_the_native_format_records_its_layout(outputs, name):
    out = outputs / name
    manifest = json.loads((out / "sparsify.json").read_text())
    if name == "native":
        assert manifest[LAYOUT_KEY] == layout_sha256(manifest["plan"], read_headers(out))
    else:
        assert LAYOUT_KEY not in manifest  # no fit check needs it: transformers' own class loads these


@pytest.mark.parametrize("writer", ["save", "save_pretrained"])
def test_every_native_writer_records_its_layout(tmp_path, writer):
    import sparsify

    moe = sparsify.upcycle("demo:gpt2", experts=4)
    if writer == "save":
        sparsify.save(moe, tmp_path / "out", shard_size="200KB")
    else:
        from sparsify.training.checkpoint import prepare_checkpoints

        prepare_checkpoints(moe).save_pretrained(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "sparsify.json").read_text())
    assert LAYOUT_KEY in manifest and as_written(manifest, read_headers(tmp_path / "out"))


@pytest.mark.parametrize("name", list(WRITERS))
def test_inspect_imports_neither_torch_nor_transformers(outputs, sparsify_cli, name):
    r, imported = _inspect_process(outputs / name, "--json")
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    code, want, _ = sparsify_cli("inspect", outputs / name, "--json")
    assert code == 0 and json.loads(r.stdout) == json.loads(want)


def _drop_digest(out: Path, manifest: dict) -> None:
    del manifest[LAYOUT_KEY]  # as every output written before the digest


def _other_digest(out: Path, manifest: dict) -> None:
    manifest[LAYOUT_KEY] = hashlib.sha256(b"another output").hexdigest()


@pytest.mark.parametrize("edit", [_drop_digest, _other_digest], ids=["no digest", "another digest"])
def test_without_its_digest_the_model_checks_it_and_reports_the_same(outputs, copy, sparsify_cli, edit):
    out = copy("native", edit)
    fast, imported = _inspect_process(outputs / "native")
    assert not imported & set(HEAVY)
    full, imported = _inspect_process(out)
    assert set(HEAVY) <= imported  # the digest does not hold: the plan's model was built
    assert full.stdout.replace(str(out), "OUT") == fast.stdout.replace(str(outputs / "native"), "OUT")
    docs = [json.loads(sparsify_cli("inspect", p, "--json")[1]) for p in (outputs / "native", out)]
    assert docs[0].pop("path") != docs[1].pop("path") and docs[0] == docs[1]


def _three_experts(out: Path, manifest: dict) -> None:
    for layer in manifest["plan"]["layers"].values():
        layer["moe"]["num_experts"] = 3
        layer["experts"] = layer["experts"][:3]


def _three_stored_experts(out: Path, manifest: dict) -> None:
    """One stacked experts tensor cut to 3 experts, its file rewritten and recorded anew."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n in weight_map if n.endswith(".experts.w1"))
    f = out / weight_map[name]
    with safe_open(str(f), framework="numpy") as st:
        tensors, metadata = {n: st.get_tensor(n) for n in st.keys()}, st.metadata()
    tensors[name] = tensors[name][:3]
    save_file(tensors, str(f), metadata=metadata)
    data = f.read_bytes()
    manifest["files"][f.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


EDITS = {
    "plan edited": [_three_experts],
    "plan edited, no digest": [_three_experts, _drop_digest],
    "plan edited, another digest": [_three_experts, _other_digest],
    "weights edited": [_three_stored_experts],
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_output_that_does_not_fit_its_plan_is_refused(copy, sparsify_cli, case):
    out = copy("native", lambda out, manifest: [edit(out, manifest) for edit in EDITS[case]])
    code, stdout, err = sparsify_cli("inspect", out)
    assert_one_line_failure(code, stdout, err, "do not fit its plan")
