"""Other libraries stay quiet unless --verbose, and slow steps show progress on a terminal.

Each command runs as a real process, as a user runs it: without the TRANSFORMERS_VERBOSITY the
test suite sets, and for progress with its stderr on a pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys

import pytest


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "TORCH_LOGS")}
    return {**env, "HF_HUB_OFFLINE": "1"}


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsify", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=600)


def run_on_terminal(*args) -> tuple[int, str, str]:
    """(exit code, stdout, what was drawn on the terminal that stderr was)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "sparsify", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave, env={**_env(), "COLUMNS": "120"})
    os.close(slave)
    drawn = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the process closed its end
                break
            if not chunk:
                break
            drawn += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    stdout = proc.stdout.read().decode()
    return proc.wait(timeout=60), stdout, drawn.decode(errors="replace")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A dense Llama checkpoint with a real tokenizer (16-token limit, so that tokenizing the
    calibration text warns), and its upcycled copy."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sparsify.cli.main import main
    from sparsify.io.demo import build_demo
    from sparsify.partition.calibration import DEMO_TEXT

    root = tmp_path_factory.mktemp("quiet")
    dense = root / "dense"
    build_demo("llama").save_pretrained(dense)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(set(DEMO_TEXT.split())))}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", model_max_length=16).save_pretrained(dense)
    assert main(["upcycle", str(dense), "-e", "4", "-o", str(root / "moe"), "-q"]) == 0
    return root


# command -> what the library prints when let through (None: nothing to let through)
CASES = {
    "inspect checkpoint": (lambda m: ["inspect", m / "dense"], None),  # reads headers, loads no weights
    "verify": (lambda m: ["verify", m / "dense", m / "moe"], "Loading weights"),  # loads the dense model
    "profile with a tokenizer": (lambda m: ["profile", m / "moe", "--demo-text", "-o", m / "stats.json", "--force"],
                                 "Token indices sequence length is longer"),
    "upcycle checkpoint": (lambda m: ["upcycle", m / "dense", "-e", "4", "-o", m / "again", "--force"], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_library_output_only_with_verbose(models, case):
    make_args, leak = CASES[case]
    quiet = _run(*make_args(models))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr  # not a terminal: no progress either
    if leak is not None:
        assert leak not in quiet.stdout
        loud = _run(*make_args(models), "--verbose")
        assert loud.returncode == 0 and leak in loud.stderr, loud.stderr  # the check can see the leak


def test_export_shows_progress_and_nothing_of_torch(tmp_path):
    # --onnx is not required; --json keeps stdout to one document while progress goes to the terminal
    code, stdout, drawn = run_on_terminal("export", "demo:bert", "-o", tmp_path / "bert.onnx", "--json")
    assert code == 0, drawn
    doc = json.loads(stdout)
    assert doc["files"] == [str(tmp_path / "bert.onnx")] and doc["graphs"][0]["outputs"] == ["last_hidden_state"]
    assert "loading demo:bert" in drawn and "exporting to ONNX" in drawn
    assert "torchvision" not in drawn and "W1" not in drawn and "[torch.onnx]" not in drawn + stdout


def test_upcycle_progress_and_quiet(models, tmp_path):
    code, stdout, drawn = run_on_terminal("upcycle", models / "dense", "-e", "4", "-o", tmp_path / "a")
    assert code == 0 and stdout.startswith("upcycled ")
    assert "loading" in drawn and "Loading weights" not in drawn
    code, stdout, drawn = run_on_terminal("upcycle", models / "dense", "-e", "4", "-o", tmp_path / "b", "--quiet")
    assert code == 0 and stdout == f"upcycled {models / 'dense'} -> {tmp_path / 'b'}\n" and drawn == ""
