"""Every output records the size and sha256 of each of its files, hashed while writing; loading
checks the sizes, `sparsify verify OUT` the hashes, and damage is one line naming the file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

import sparsify
from sparsify.errors import SparsifyError
from tests.io.promises import assert_one_line_failure, snapshot

# name -> upcycle arguments (source, options); sources "dense" are a checkpoint with tokenizer files
WRITERS = {
    "native": ("dense", ["--format", "native"]),
    "mixtral": ("dense", ["--format", "mixtral", "--every", "1"]),
    "qwen2-moe": ("demo:qwen2", ["--format", "qwen2-moe", "--every", "1"]),
    "switch": ("demo:t5", ["--format", "switch", "--router", "switch"]),
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Each writer's output (written by the CLI) and a shards directory cut from the native one."""
    from sparsify.cli.main import main
    from sparsify.io.demo import build_demo

    root = tmp_path_factory.mktemp("outputs")
    build_demo("llama").save_pretrained(root / "dense")
    (root / "dense" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (root / "dense" / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    for name, (source, options) in WRITERS.items():
        src = str(root / "dense") if source == "dense" else source
        assert main(["upcycle", src, "--experts", "4", "--shard-size", "300KB", "-o", str(root / name), *options]) == 0
    assert main(["partition", str(root / "native"), "-n", "2", "-o", str(root / "plan.json")]) == 0
    assert main(["shard", str(root / "native"), "--plan", str(root / "plan.json"), "-o", str(root / "shards")]) == 0
    return root


MANIFESTS = {**{name: "sparsify.json" for name in WRITERS}, "shards": "shards.json"}


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_every_file_is_recorded_with_its_size_and_hash(outputs, name):
    out = outputs / name
    files = json.loads((out / MANIFESTS[name]).read_text())["files"]
    assert set(files) == {p.name for p in out.iterdir()} - {MANIFESTS[name]}
    for f, record in files.items():
        data = (out / f).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, f
    if name in ("native", "mixtral", "shards"):
        assert {"tokenizer_config.json", "special_tokens_map.json"} <= set(files)
    assert sum(f.endswith(".safetensors") for f in files) >= 2  # several shards, each recorded


@pytest.fixture
def copy(outputs, tmp_path):
    def get(name: str) -> Path:
        shutil.copytree(outputs / name, tmp_path / name)
        return tmp_path / name
    return get


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _victims(out: Path, manifest: str) -> list[str]:
    files = sorted(json.loads((out / manifest).read_text())["files"])
    weights = [f for f in files if f.endswith(".safetensors")]
    return [weights[-1], "config.json", *[f for f in files if f.endswith(".json") and f != "config.json"][:1]]


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_verify_names_the_damaged_file(copy, sparsify_cli, name):
    out = copy(name)
    code, stdout, err = sparsify_cli("verify", out)
    assert code == 0 and "OK" in stdout and err == "", (stdout, err)
    for victim in _victims(out, MANIFESTS[name]):
        original = (out / victim).read_bytes()
        _flip(out / victim)
        before = snapshot(out)
        code, stdout, err = sparsify_cli("verify", out)
        line = assert_one_line_failure(code, stdout, err, "does not match the sha256")
        assert f"{victim}'" in line
        assert snapshot(out) == before  # verify changes nothing
        (out / victim).write_bytes(original)


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_loading_notices_a_truncated_file(copy, sparsify_cli, name):
    out = copy(name)
    victim = _victims(out, MANIFESTS[name])[0]
    data = (out / victim).read_bytes()
    (out / victim).write_bytes(data[:-1])
    from sparsify.partition.shards import read_shard_manifest

    load = read_shard_manifest if name == "shards" else sparsify.load  # what a rank reads first
    with pytest.raises(SparsifyError, match=f"{victim}' has {len(data) - 1} bytes but .* records {len(data)}"):
        load(out)
    if name != "shards":
        code, stdout, err = sparsify_cli("inspect", out)
        assert_one_line_failure(code, stdout, err, f"{victim}' has {len(data) - 1} bytes")


def test_shard_refuses_a_damaged_model(copy, outputs, sparsify_cli, tmp_path):
    out = copy("native")
    victim = _victims(out, "sparsify.json")[0]
    (out / victim).write_bytes((out / victim).read_bytes() + b"\0")
    before = snapshot(tmp_path)
    code, stdout, err = sparsify_cli("shard", out, "--plan", outputs / "plan.json", "-o", tmp_path / "shards")
    assert_one_line_failure(code, stdout, err, f"{victim}' has")
    assert snapshot(tmp_path) == before


def _edit(change):
    def damage(path: Path) -> None:
        text = (path / "sparsify.json").read_text()
        path.joinpath("sparsify.json").write_text(change(json.loads(text)) if callable(change) else change)
    return damage


def _set_experts(m):
    for layer in m["plan"]["layers"].values():
        layer["moe"]["num_experts"] = 3
        layer["experts"] = layer["experts"][:3]
    return json.dumps(m)


MANIFEST_DAMAGE = {
    "not JSON": (_edit('{"format": "sparsify-native", "plan": '), "not valid JSON"),
    "a list": (_edit("[]"), "not a JSON object"),
    "no format": (_edit(lambda m: json.dumps({k: v for k, v in m.items() if k != "format"})), "names no format"),
    "no plan": (_edit(lambda m: json.dumps({k: v for k, v in m.items() if k != "plan"})), "has no plan"),
    "plan a string": (_edit(lambda m: json.dumps({**m, "plan": "top-2"})), "a plan that is a str"),
    "plan empty": (_edit(lambda m: json.dumps({**m, "plan": {}})), "damaged plan"),
    "num_experts edited": (_edit(_set_experts), "do not fit its plan"),
    "files a list": (_edit(lambda m: json.dumps({**m, "files": []})), "damaged 'files' entry"),
    "file outside the output": (_edit(lambda m: json.dumps({**m, "files": {"../x": {"size": 1, "sha256": "0" * 64}}})),
                                "damaged 'files' entry"),
    "sparsify.json a directory": (lambda p: ((p / "sparsify.json").unlink(), (p / "sparsify.json").mkdir()), "is a directory"),
}


@pytest.mark.parametrize("case", list(MANIFEST_DAMAGE))
@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_damaged_manifest_is_one_line(copy, sparsify_cli, tmp_path, case, command):
    damage, match = MANIFEST_DAMAGE[case]
    out = copy("native")
    damage(out)
    if command == "verify" and case == "num_experts edited":
        match = "OK"  # the files are intact; what they mean is for sparsify.load to find out
    before = snapshot(tmp_path)
    code, stdout, err = sparsify_cli(command, out)
    if match == "OK":
        assert code == 0 and "OK" in stdout
    else:
        assert_one_line_failure(code, stdout, err, match)
    assert snapshot(tmp_path) == before


def test_verify_an_output_without_records(copy, sparsify_cli):
    out = copy("native")
    manifest = json.loads((out / "sparsify.json").read_text())
    del manifest["files"]
    (out / "sparsify.json").write_text(json.dumps(manifest))
    assert sparsify.load(out) is not None  # older outputs still load
    code, stdout, err = sparsify_cli("verify", out)
    assert_one_line_failure(code, stdout, err, "records no sizes or hashes")


def test_writer_hash_is_of_the_bytes_written(tmp_path):
    import os

    from sparsify.io.direct_write import open_output

    for direct in (True, False):
        chunks = [os.urandom(n) for n in (1, 4095, 4097, (32 << 20) + 5, 3)]
        f = open_output(tmp_path / f"x{direct}", direct=direct)
        for c in chunks:
            f.write(memoryview(c))
        f.close()
        data = (tmp_path / f"x{direct}").read_bytes()
        assert data == b"".join(chunks)
        assert (f.size, f.sha256) == (len(data), hashlib.sha256(data).hexdigest())
