"""Outputs never go onto, around or into a source, `--force` replaces only like by like, a
replaced output is swapped in on its own file system, and temporaries are named per host."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import sparsify
from sparsify.errors import OutputError
from sparsify.io import atomic
from sparsify.io.atomic import atomic_directory, clean_stale
from tests.io.promises import assert_one_line_failure, snapshot, temporaries


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Made once: a dense llama checkpoint, its native upcycled output, a placement, and a
    small ONNX file with its weights in external data."""
    from sparsify.io.demo import build_demo

    root = tmp_path_factory.mktemp("built")
    build_demo("llama").save_pretrained(root / "dense")
    sparsify.save(sparsify.upcycle(str(root / "dense"), experts=4), root / "moe")
    from sparsify.cli.main import main

    assert main(["partition", str(root / "moe"), "-n", "2", "-o", str(root / "plan.json")]) == 0
    import onnx

    from tests.onnx.helpers import ffn_graph

    m = onnx.load(ffn_graph(root / "plain.onnx"))
    onnx.save_model(m, root / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    return root


@pytest.fixture
def work(tmp_path, built):
    """A copy of everything built, under tmp_path/parent, and tmp_path/parent/dense linked as lnk."""
    parent = tmp_path / "parent"
    shutil.copytree(built, parent)
    (tmp_path / "lnk").symlink_to(parent / "dense")
    (tmp_path / "some_dir").mkdir()
    (tmp_path / "some_dir" / "keep.txt").write_text("mine")
    (tmp_path / "some_file").write_text("mine")
    return tmp_path


# (command line with {t} for the work directory, the message's key words)
REFUSED = {
    "upcycle onto its source": ("upcycle {t}/parent/dense -e 4 -o {t}/parent/dense --force", "is the source"),
    "upcycle onto the source's parent": ("upcycle {t}/parent/dense -e 4 -o {t}/parent --force", "holds the source"),
    "upcycle into its source": ("upcycle {t}/parent/dense -e 4 -o {t}/parent/dense/moe", "lies inside the source"),
    "upcycle through a symlinked source": ("upcycle {t}/lnk -e 4 -o {t}/parent/dense --force", "is the source"),
    "upcycle onto a symlink to the source": ("upcycle {t}/parent/dense -e 4 -o {t}/lnk --force", "is the source"),
    "upcycle a demo over a file": ("upcycle demo:t5 -e 4 -o {t}/some_file --force", "is a file"),
    "upcycle onnx onto its source": ("upcycle {t}/parent/ext.onnx -e 4 --every 1 -o {t}/parent/ext.onnx --force", "is the source"),
    "upcycle onnx onto its external data": ("upcycle {t}/parent/ext.onnx -e 4 --every 1 -o {t}/parent/ext.onnx.data --force", "is the source"),
    "upcycle onnx over a directory": ("upcycle {t}/parent/ext.onnx -e 4 --every 1 -o {t}/some_dir --force", "is a directory"),
    "shard onto its source": ("shard {t}/parent/moe --plan {t}/parent/plan.json -o {t}/parent/moe --force", "is the source"),
    "shard onto the source's parent": ("shard {t}/parent/moe --plan {t}/parent/plan.json -o {t}/parent --force", "holds the source"),
    "shard onto its plan": ("shard {t}/parent/moe --plan {t}/parent/plan.json -o {t}/parent/plan.json --force", "is the source"),
    "export onto its source": ("export {t}/parent/moe --onnx -o {t}/parent/moe --force", "is the source"),
    "export over a directory": ("export {t}/parent/moe --onnx -o {t}/some_dir --force", "is a directory"),
    "profile into its source": ("profile {t}/parent/moe --demo-text -o {t}/parent/moe/stats.json", "lies inside the source"),
    "profile over a directory": ("profile {t}/parent/moe --demo-text -o {t}/some_dir --force", "is a directory"),
    "partition into its source": ("partition {t}/parent/moe -n 2 -o {t}/parent/moe/plan.json", "lies inside the source"),
    "partition onto its source": ("partition {t}/parent/moe -n 2 -o {t}/parent/moe --force", "is the source"),
    "parent does not exist": ("upcycle demo:t5 -e 4 -o {t}/no/such/out", "does not exist"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_outputs_change_nothing(work, sparsify_cli, case):
    command, match = REFUSED[case]
    before = snapshot(work)
    code, out, err = sparsify_cli(*command.format(t=work).split())
    assert_one_line_failure(code, out, err, match)
    assert snapshot(work) == before  # nothing written, nothing removed, no temporaries


@pytest.mark.parametrize("where", [".", "..", "../.."])
@pytest.mark.parametrize("force", [False, True])
def test_current_directory_and_above_are_never_outputs(work, sparsify_cli, monkeypatch, where, force):
    inner = work / "some_dir"
    monkeypatch.chdir(inner)
    before = snapshot(work)
    code, out, err = sparsify_cli("upcycle", "demo:t5", "-e", "4", "-o", where, *(["--force"] if force else []))
    assert_one_line_failure(code, out, err, "never replaced")
    assert snapshot(work) == before


@pytest.mark.parametrize("target", ["source", "loaded", "parent of loaded", "inside loaded"])
def test_save_never_writes_over_the_models_sources(work, target):
    dense, moe = work / "parent" / "dense", work / "parent" / "moe"
    model = sparsify.upcycle(str(dense), experts=2) if target == "source" else sparsify.load(moe)
    out = {"source": dense, "loaded": moe, "parent of loaded": work / "parent", "inside loaded": moe / "again"}[target]
    before = snapshot(work)
    with pytest.raises(OutputError, match="the source") as err:
        sparsify.save(model, out, force=True)
    assert "\n" not in str(err.value)
    assert snapshot(work) == before


def test_force_through_a_symlink_to_another_file_system(tmp_path, sparsify_cli):
    """OUT is a link to a directory on another file system: the new output replaces the link's
    target there (renames on that file system, no EXDEV) and the link stays a link."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's temporary directory")
    elsewhere = Path(tempfile.mkdtemp(dir=shm, prefix="sparsify-test-"))
    try:
        real = elsewhere / "real"
        sparsify.save(sparsify.upcycle("demo:t5", experts=2), real)
        (tmp_path / "out").symlink_to(real)
        code, out, err = sparsify_cli("upcycle", "demo:t5", "-e", "4", "-o", tmp_path / "out", "--force")
        assert code == 0, err
        assert (tmp_path / "out").is_symlink() and os.readlink(tmp_path / "out") == str(real)
        assert sparsify.load(tmp_path / "out").sparsify_plan.moe.num_experts == 4
        assert temporaries(elsewhere) == [] and temporaries(tmp_path) == []
        assert sorted(p.name for p in elsewhere.iterdir()) == ["real"]
    finally:
        shutil.rmtree(elsewhere)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_take_their_permissions_from_the_umask(tmp_path, sparsify_cli, umask):
    previous = os.umask(umask)
    try:
        code, _, err = sparsify_cli("upcycle", "demo:t5", "-e", "4", "-o", tmp_path / "out")
        assert code == 0, err
        code, _, err = sparsify_cli("profile", tmp_path / "out", "--demo-text", "-o", tmp_path / "stats.json")
        assert code == 0, err
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in (tmp_path / "out").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert (tmp_path / "stats.json").stat().st_mode & 0o777 == 0o666 & ~umask


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_this_host_only_are_removed(tmp_path):
    out = tmp_path / "out"
    host = atomic._HOST
    other = "another-host" if host != "another-host" else "yet-another-host"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".out.tmp-{host}-{_dead_pid()}-0a1b2c3d": False,  # this host, process gone: removed
            f".out.old-{host}-{_dead_pid()}-0a1b2c3e": False,
            f".out.tmp-{host}-{sleeper.pid}-0a1b2c3f": True,  # this host, still running: kept
            f".out.tmp-{other}-{_dead_pid()}-0a1b2c40": True,  # another host's: kept, whatever its pid
            f".other.tmp-{host}-{_dead_pid()}-0a1b2c41": True,  # another output's
        }
        out.mkdir()  # the output is in place, so a previous one left aside is garbage
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "shard.safetensors").write_bytes(b"x" * 100)
        clean_stale(out)
        assert {p.name for p in tmp_path.iterdir()} == {"out", *(n for n, kept in names.items() if kept)}
        # A swap killed between its two renames left the previous output aside: put back.
        out.rmdir()
        aside = tmp_path / f".out.old-{host}-{_dead_pid()}-0a1b2c42"
        aside.mkdir()
        (aside / "config.json").write_text("{}")
        clean_stale(out)
        assert (out / "config.json").read_text() == "{}" and not aside.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert socket.gethostname()  # the name the temporaries carry comes from here


def test_temporaries_carry_host_and_pid(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".out.tmp-{atomic._HOST}-{os.getpid()}-")
        assert tmp in atomic.live_temporaries()
    assert atomic.live_temporaries() == {}


def test_swap_without_renameat2_keeps_the_previous_output_when_a_rename_fails(tmp_path, monkeypatch):
    """Where the kernel lacks RENAME_EXCHANGE the swap is two renames; if the second fails (here
    made to fail, as a full or broken file system would), the previous output is put back."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    monkeypatch.setattr(atomic, "_renameat2", lambda a, b, flags: __import__("errno").ENOSYS)
    with atomic_directory(out, force=True) as tmp:  # the fallback works end to end
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    real_rename = os.rename

    def failing(a, b):
        if ".tmp-" in str(a):
            raise OSError(5, "Input/output error", str(b))
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OutputError, match="nothing was written; the previous '.*out' is untouched"):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "newer.txt").write_text("newer")
    assert (out / "new.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
