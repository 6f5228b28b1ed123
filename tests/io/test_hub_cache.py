"""Hub ids found in a real Hugging Face cache under their legacy or current name.

The cache is written in the layout huggingface_hub reads (models--ORG--NAME/ with blobs/,
snapshots/REV/ of symlinks to the blobs, refs/main), holding a real tiny model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sparsify.errors import SourceError

REVISION = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(hub: Path, repo_id: str, model) -> Path:
    """`model` saved into the hub cache at `hub` as the snapshot of `repo_id`; returns the snapshot."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    staging = hub.parent / f"staging-{repo_id.replace('/', '--')}"
    model.save_pretrained(staging)
    for f in sorted(staging.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub in this process reads, offline."""
    from huggingface_hub import constants

    path = tmp_path / "hf" / "hub"
    path.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return path


def test_the_readme_command_finds_the_current_id(tmp_path, demo):
    # `sparsify upcycle t5-base ...` with the cache holding google-t5/t5-base, in a real process
    write_hub_cache(tmp_path / "hf" / "hub", "google-t5/t5-base", demo("t5"))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "sparsify", "upcycle", "t5-base", "-e", "4", "-o", str(tmp_path / "moe"),
                        "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["streamed"] is True  # converted from the cached checkpoint's files
    r = subprocess.run([sys.executable, "-m", "sparsify", "inspect", "t5-base"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0 and "using the cached 'google-t5/t5-base'" in r.stdout, r.stdout + r.stderr
    import sparsify
    from sparsify.verify import compare

    assert compare(demo("t5"), sparsify.load(tmp_path / "moe")).within()


@pytest.mark.parametrize("cached, asked", [("google-t5/t5-base", "t5-base"), ("t5-base", "google-t5/t5-base"),
                                           ("openai-community/gpt2", "GPT2")])
def test_legacy_and_current_ids_find_each_other(hub, demo, cached, asked):
    from sparsify.io.sources import load_source, resolve_source
    from sparsify.verify import compare

    snapshot = write_hub_cache(hub, cached, demo("gpt2"))
    src = resolve_source(asked)
    assert src.kind == "hub" and src.path == snapshot and [f.name for f in src.files] == ["model.safetensors"]
    model, _ = load_source(src)
    assert compare(demo("gpt2"), model).max_abs == 0.0


def test_exact_id_wins_and_other_orgs_are_not_aliases(hub, demo):
    from sparsify.io.sources import resolve_source

    legacy = write_hub_cache(hub, "t5-base", demo("t5"))
    current = write_hub_cache(hub, "google-t5/t5-base", demo("t5"))
    assert resolve_source("t5-base").path == legacy
    assert resolve_source("google-t5/t5-base").path == current
    shutil.rmtree(legacy.parents[1])
    with pytest.raises(SourceError, match="not in the Hugging Face cache"):
        resolve_source("someone/t5-base")  # one organisation's model is not another's


def test_several_candidates_are_named(hub, demo):
    from sparsify.io.sources import resolve_source

    write_hub_cache(hub, "google-t5/t5-base", demo("t5"))
    write_hub_cache(hub, "mirror/t5-base", demo("t5"))
    with pytest.raises(SourceError, match="several cached models have its name: google-t5/t5-base, mirror/t5-base"):
        resolve_source("t5-base")


def test_not_found_names_what_the_cache_holds(hub, demo):
    from sparsify.io.sources import resolve_source

    write_hub_cache(hub, "google-t5/t5-base", demo("t5"))
    write_hub_cache(hub, "openai-community/gpt2", demo("gpt2"))
    with pytest.raises(SourceError, match=r"closest cached models are google-t5/t5-base"):
        resolve_source("google-t5/t5-small")
    with pytest.raises(SourceError, match=rf"the cache \({hub}\) holds google-t5/t5-base, openai-community/gpt2\)"):
        resolve_source("bert-base-uncased")
    for f in hub.iterdir():
        shutil.rmtree(f)
    with pytest.raises(SourceError, match="holds no models"):
        resolve_source("bert-base-uncased")
