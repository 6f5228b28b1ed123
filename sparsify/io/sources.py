"""Where models come from: a local Hugging Face directory, a hub id, or a built-in demo.

Local directories and hub snapshots are read with transformers' own loader (safetensors first,
`.bin` only through `torch.load(weights_only=True)`, never remote code), and every tensor the
architecture expects must be in the checkpoint: a missing or misshapen tensor is an error, not
a silent random initialisation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import SourceError
from .demo import DEMOS, build_demo
from .checkpoint import weight_files
from .hub_cache import cached_alias, describe_cache
from .paths import regular_file

if TYPE_CHECKING:  # resolving a source imports no torch (`sparsify inspect` of an output needs none)
    import torch.nn as nn

    from .tensor_names import TensorNames

__all__ = ["Source", "load_source", "resolve_source", "skeleton_of", "read_config", "WEIGHT_PATTERNS", "TOKENIZER_FILES",
           "sha256_files", "fingerprint_files", "FINGERPRINT"]

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
    "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Source:
    """A resolved model source: what the user typed, its kind, and its local directory if any."""

    spec: str
    kind: str  # "demo" | "dir" | "hub" | "module"
    path: Path | None = None
    files: list[Path] = field(default_factory=list)

    def describe(self) -> dict:
        """Provenance for `sparsify.json`: spec, kind, and the fingerprint of each weight file."""
        return {"spec": self.spec, "kind": self.kind, FINGERPRINT: fingerprint_files(self.files)}


# What an output records of its sources' weight files: XXH3-128 of each (the xxhash library).
# It identifies a source (is DENSE the model this output was made from?), against accident, not
# against forgery, so it need not be cryptographic; and it runs at the page cache's speed (about
# 7 GB/s here, sha256 1.4 GB/s), where sha256 of four TinyLlama-sized expert sources (11 GB) held
# a merge up by 7 s of its 22. The output's own files are still recorded by sha256, while written.
FINGERPRINT = "xxh3_128"


def fingerprint_files(files: list[Path]) -> dict[str, str]:
    """XXH3-128 (hex) of each file, keyed by file name."""
    import xxhash

    return _digest_files(files, xxhash.xxh3_128)


def sha256_files(files: list[Path]) -> dict[str, str]:
    """sha256 of each file, keyed by file name (what outputs written before `FINGERPRINT` record)."""
    return _digest_files(files, hashlib.sha256)


def _digest_files(files: list[Path], new: Callable[[], Any]) -> dict[str, str]:
    out = {}
    buf = memoryview(bytearray(16 << 20))
    for f in files:
        h = new()
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                h.update(buf[:n])
        out[f.name] = h.hexdigest()
    return out


def _weight_files(path: Path) -> list[Path]:
    # Resolving reads no weights; a damaged index is reported when the weights are read.
    try:
        return weight_files(path)[0]
    except SourceError:
        return []


def _resolve_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["config.json", *WEIGHT_PATTERNS, *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    except Exception as err:  # invalid repo id and the like
        raise SourceError(f"'{repo_id}' is neither a local path nor a valid hub id ({err})") from None
    alias = cached_alias(repo_id)  # cached under its legacy or its current id
    if alias is not None:
        return Path(snapshot_download(alias, allow_patterns=patterns, local_files_only=True))
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    hint = f"download '{repo_id}' where the hub is reachable or pass the path of a local model directory"
    if offline:
        raise SourceError(f"'{repo_id}' is not a local path and is not in the Hugging Face cache (HF_HUB_OFFLINE is set; "
                          f"{describe_cache(repo_id)}); {hint}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:
        reason = type(err).__name__
        raise SourceError(f"'{repo_id}' is not a local path and could not be fetched from the hub ({reason}; "
                          f"{describe_cache(repo_id)}); {hint}") from None


def resolve_source(spec: str) -> Source:
    """Decide what `spec` names and find its files; reads no weights."""
    if spec.startswith("demo:"):
        name = spec[len("demo:"):]
        if name not in DEMOS:
            raise SourceError(f"unknown demo '{spec}'; choose one of {', '.join('demo:' + d for d in DEMOS)}")
        return Source(spec, "demo")
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"'{spec}' is a file; pass a model directory in Hugging Face layout (with config.json)")
        config = path / "config.json"
        if not (config.exists() or config.is_symlink()):
            raise SourceError(f"'{spec}' has no config.json; pass a model directory in Hugging Face layout")
        regular_file(config, "config file")  # a pipe would block the reader
        return Source(spec, "dir", path, _weight_files(path))
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
    if looks_like_path or not _HUB_ID.match(spec):
        raise SourceError(f"no such file or directory: '{spec}'")
    snapshot = _resolve_hub(spec)
    if not (snapshot / "config.json").is_file():
        raise SourceError(f"hub model '{spec}' has no config.json; it is not a transformers model")
    return Source(spec, "hub", snapshot, _weight_files(snapshot))


def is_native(path: Path | None) -> bool:
    """True when `path` is a directory in sparsify's native format (see sparsify.formats.native).
    Outputs in Hugging Face formats carry a sparsify.json too, naming their format."""
    manifest = path / "sparsify.json" if path is not None else None
    if manifest is None or not (manifest.exists() or manifest.is_symlink()):
        return False
    if not manifest.is_file():
        return True  # damaged: reading it as native reports the damage
    try:
        data = json.loads(manifest.read_text())
    except (ValueError, OSError):
        return True  # damaged: reading it as native reports the damage
    return not isinstance(data, dict) or data.get("format") in ("sparsify-native", None)


def read_config(path: Path, spec: str):
    """The transformers config of the model directory `path` (never remote code)."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as err:
        raise SourceError(f"cannot read the config of '{spec}': {str(err).splitlines()[0][:200]}") from None


def skeleton_of(src: Source) -> tuple[nn.Module, TensorNames | None]:
    """The architecture of a demo, directory or hub source with meta parameters, and its
    checkpoint seen by the architecture's tensor names, as transformers maps them (headers read,
    every tensor present, shapes checked; None for a demo): what planning and inspecting need,
    without the weights. The names are the dense model's, before any pass rewrites it."""
    from .checkpoint import Checkpoint
    from .skeleton import build_skeleton, model_class
    from .tensor_names import TensorNames

    if src.kind == "demo":
        return build_skeleton(DEMOS[src.spec[len("demo:"):]]()), None
    config = read_config(src.path, src.spec)
    ckpt = Checkpoint(src.path, src.spec)
    model = build_skeleton(config, model_class(config))
    names = TensorNames(ckpt, model)
    names.check(src.spec)
    return model, names


def load_pretrained(path: Path, spec: str) -> nn.Module:
    """A dense transformers model from a local directory, every tensor checked present."""
    from .checkpoint import Checkpoint
    from .skeleton import model_class, build_skeleton

    config = read_config(path, spec)
    cls = model_class(config)
    # Headers, shards and shapes are checked before transformers reads anything, so that a
    # damaged or mismatched checkpoint is named precisely.
    Checkpoint(path, spec).check_shapes(build_skeleton(config, cls), spec)
    try:
        model, info = cls.from_pretrained(
            path, config=config, dtype="auto", trust_remote_code=False, local_files_only=True, output_loading_info=True
        )
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SourceError(f"cannot read the weights of '{spec}' (truncated or corrupt file?): {first}") from None
    problems = [*info.get("missing_keys", []), *[m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", [])]]
    if problems:
        raise SourceError(
            f"'{spec}': checkpoint lacks or misshapes tensor '{sorted(problems)[0]}' that the config requires "
            f"({len(problems)} in all); the weights do not match config.json"
        )
    return model.eval()


def load_source(spec: str | Source, seed: int = 0) -> tuple[nn.Module, Source]:
    """The dense model that `spec` names, and its resolved `Source`."""
    src = spec if isinstance(spec, Source) else resolve_source(spec)
    if src.kind == "demo":
        return build_demo(src.spec[len("demo:"):], seed=seed), src
    if is_native(src.path):
        raise SourceError(f"'{src.spec}' is already an upcycled model; use sparsify.load() or pass its dense source")
    return load_pretrained(src.path, src.spec), src


