"""Bad input: a one-line message, non-zero exit, no traceback, and no output left behind."""


import pytest

from tests.conftest import run_cli


def _assert_clean_failure(code, out, err, tmp_path, match, out_name="out"):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err + out
    assert match in lines[0], lines[0]
    assert not (tmp_path / out_name).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "temporary output left behind"


@pytest.fixture
def dense_dir(tmp_path, demo):
    d = tmp_path / "dense"
    demo("llama").save_pretrained(d)
    return d


CASES = {
    "missing path": (lambda t, d: ["./no/such/model", "--experts", "4"], "no such file or directory"),
    "no config.json": (lambda t, d: [str((t / "empty").mkdir() or t / "empty"), "--experts", "4"], "no config.json"),
    "experts below 2": (lambda t, d: ["demo:t5", "--experts", "1"], "at least 2"),
    "top-k zero": (lambda t, d: ["demo:t5", "--experts", "4", "--top-k", "0"], "--top-k"),
    "top-k above experts": (lambda t, d: ["demo:t5", "--experts", "4", "--top-k", "5"], "--top-k"),
    "every zero": (lambda t, d: ["demo:t5", "--experts", "4", "--every", "0"], "--every"),
    "layers out of range": (lambda t, d: ["demo:t5", "--experts", "4", "--layers", "1,7"], "out of range"),
    "expert choice on decoder": (lambda t, d: ["demo:llama", "--experts", "4", "--router", "expert-choice"], "causal"),
    "bad router": (lambda t, d: ["demo:t5", "--experts", "4", "--router", "nope"], "--router"),
    **{f"shard size {v}": (lambda t, d, v=v: ["demo:t5", "--experts", "4", "--shard-size", v], "shard size must be")
       for v in ("nan", "inf", "1e400", "-inf", "-1GB", "0", "0.5B")},
    "shard size unreadable": (lambda t, d: ["demo:t5", "--experts", "4", "--shard-size", "lots"], "cannot read shard size"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_upcycle_input(tmp_path, sparsify_cli, case):
    make_args, match = CASES[case]
    args = make_args(tmp_path, None)
    code, out, err = sparsify_cli("upcycle", *args, "-o", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, match)


def test_corrupt_safetensors(tmp_path, dense_dir, sparsify_cli):
    weights = dense_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, out, err = sparsify_cli("upcycle", dense_dir, "--experts", "4", "-o", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, "truncated or corrupt")


def test_garbage_safetensors(tmp_path, dense_dir, sparsify_cli):
    (dense_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    code, out, err = sparsify_cli("upcycle", dense_dir, "--experts", "4", "-o", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, "truncated or corrupt")


def test_output_exists_without_force(tmp_path, sparsify_cli):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, out, err = sparsify_cli("upcycle", "demo:t5", "--experts", "4", "-o", tmp_path / "out")
    assert code != 0 and "--force" in err and "Traceback" not in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_output_not_writable(tmp_path, sparsify_cli):
    code, out, err = sparsify_cli("upcycle", "demo:t5", "--experts", "4", "-o", "/proc/sparsify-out")
    assert code != 0 and "not writable" in err and len(err.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, err = sparsify_cli("upcycle", "demo:t5", "--experts", "4", "-o", blocker / "out")
    assert code != 0 and "does not exist" in err


def test_hub_id_offline_not_in_cache(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = run_cli("upcycle", "t5-base", "--experts", "4", "-o", str(tmp_path / "out"), env=env)
    _assert_clean_failure(r.returncode, r.stdout, r.stderr, tmp_path, "not in the Hugging Face cache")
    assert "local" in r.stderr


def test_no_ffn_in_model(tmp_path, sparsify_cli):
    # A real transformers architecture whose MLP sits inline next to other ops has no FFN site.
    import torch.nn as nn

    import sparsify
    from sparsify.errors import NoFFNFoundError

    class Inline(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.a, self.b = nn.LayerNorm(4), nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(self.a(self.norm(x)).relu())

    import torch

    with pytest.raises(NoFFNFoundError, match="rejected candidates: a: the activation \\(relu\\) .* is plain code in the forward of '', .*make it a module"):
        sparsify.upcycle(Inline(), experts=4, example_inputs=(torch.randn(2, 4),))


def test_traceback_free_in_a_real_process(tmp_path):
    r = run_cli("upcycle", "demo:nope", "--experts", "4", "-o", str(tmp_path / "out"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "unknown demo" in r.stderr


def test_usage_error_is_one_line(tmp_path, sparsify_cli):
    code, out, err = sparsify_cli("upcycle", "demo:t5", "-o", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, "--experts")


def _sharded_llama(tmp_path, demo):
    d = tmp_path / "sharded"
    demo("llama").save_pretrained(d, max_shard_size="100KB")
    return d, sorted(d.glob("model-*.safetensors"))


STREAMING_CASES = {
    "truncated shard": (lambda d, shards: shards[-1].write_bytes(shards[-1].read_bytes()[:-100]), [], "truncated or corrupt"),
    "shard listed but missing": (lambda d, shards: shards[0].unlink(), [], "listed in model.safetensors.index.json but missing"),
    "shape disagrees with config": (
        lambda d, shards: (d / "config.json").write_text((d / "config.json").read_text().replace('"intermediate_size": 128', '"intermediate_size": 96')),
        [], "do not match config.json"),
    "format cannot express plan": (lambda d, shards: None, ["--format", "mixtral", "--every", "2"], "Mixtral has no sparse step"),
    "format for another architecture": (lambda d, shards: None, ["--format", "switch"], "--format switch cannot express"),
}


@pytest.mark.parametrize("case", list(STREAMING_CASES))
def test_bad_checkpoint_for_streaming(tmp_path, demo, sparsify_cli, case):
    damage, extra, match = STREAMING_CASES[case]
    d, shards = _sharded_llama(tmp_path, demo)
    damage(d, shards)
    code, out, err = sparsify_cli("upcycle", d, "--experts", "4", "-o", tmp_path / "out", *extra)
    _assert_clean_failure(code, out, err, tmp_path, match)
