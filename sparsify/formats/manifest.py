"""The `sparsify.json` of an output (any format), read with a one-line error for each kind of
damage: missing, not a regular file, not JSON, not an object, no format, no plan or a plan
that does not parse, and (always, since it costs a stat per file) output files whose size is
not the recorded one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import SourceError, SparsifyError
from ..io.integrity import check_files, files_of
from ..io.paths import regular_file
from ..plan import UpcyclePlan

__all__ = ["MANIFEST", "NATIVE_FORMAT", "STORED_FORMATS", "read_output_manifest", "output_format", "plan_of", "verify_output"]

MANIFEST = "sparsify.json"
# The format names a sparsify.json may hold, spelt out rather than read from the registry, which
# imports the writers and torch: an output's manifest and plan are read without either
# (`sparsify inspect`). tests/formats/test_stored.py checks that they are the registry's.
NATIVE_FORMAT = "sparsify-native"
STORED_FORMATS = (NATIVE_FORMAT, "mixtral", "qwen2-moe", "switch")


def read_output_manifest(path: str | Path, check_sizes: bool = True) -> dict[str, Any]:
    """The validated `sparsify.json` of output directory `path`; with `check_sizes`, every file
    it lists must exist with its recorded size."""
    import json

    path = Path(path)
    f = path / MANIFEST
    if not (f.exists() or f.is_symlink()):
        raise SourceError(f"'{path}' has no {MANIFEST}; it is not a model written by sparsify")
    regular_file(f, "manifest")
    try:
        data = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise SourceError(f"'{f}' is not valid JSON ({err}); the output is damaged, write it again") from None
    if not isinstance(data, dict):
        raise SourceError(f"'{f}' is not a JSON object; the output is damaged, write it again")
    if not isinstance(data.get("format"), str):
        raise SourceError(f"'{f}' names no format; the output is damaged, write it again")
    known = sorted(STORED_FORMATS)
    if data["format"] not in known:
        raise SourceError(f"'{f}' names the format {data['format'][:40]!r}, which is none of {', '.join(known)}; "
                          "the output is damaged (or written by a newer sparsify), write it again")
    if not isinstance(data.get("plan"), dict):
        what = "no plan" if "plan" not in data else f"a plan that is a {type(data['plan']).__name__}, not an object"
        raise SourceError(f"'{f}' has {what}; the output is damaged, write it again")
    if check_sizes:
        check_files(path, files_of(data, str(f)), MANIFEST)
    return data


def output_format(path: str | Path) -> str | None:
    """The format named in a sparsify output's sparsify.json (None if it has none)."""
    import json

    manifest = Path(path) / MANIFEST
    if not (manifest.exists() or manifest.is_symlink()):
        return None
    try:
        data = json.loads(manifest.read_text()) if manifest.is_file() else None
    except (OSError, ValueError):
        data = None
    if data is None:
        return "damaged"  # loading it reports the damage
    fmt = data.get("format") if isinstance(data, dict) else None
    return fmt if isinstance(fmt, str) else "damaged"


def plan_of(manifest: dict[str, Any], where: str | Path) -> UpcyclePlan:
    """The plan stored in a manifest read from `where`, or a one-line error when it does not parse."""
    try:
        plan = UpcyclePlan.from_dict(manifest["plan"])
        # from_dict checks the structure; these read every layer's values (a dict where a number
        # belongs, found by tests/io/test_fuzz.py), so that a wrong type is this one line too.
        plan.why_not_preserving()
        plan.param_counts(0)
    except SparsifyError as err:
        # its checks speak of the CLI options that would have made such a plan: name the fields
        detail = re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), str(err))[:200]
        raise SourceError(f"'{where}' holds a damaged plan ({detail}); the output is damaged, write it again") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        detail = f"{type(err).__name__}: {err}"[:200]
        raise SourceError(f"'{where}' holds a damaged plan ({detail}); the output is damaged, write it again") from None
    if not plan.selected or any(p not in plan.layers for p in plan.selected):
        # Every written plan has both; without them the output would load as its dense source.
        raise SourceError(f"'{where}' holds a damaged plan (no MoE settings or no selected layers); "
                          "the output is damaged, write it again")
    return plan


def verify_output(path: str | Path) -> tuple[str, int]:
    """Check every file of output directory `path` (written by `sparsify upcycle`, `save` or
    `shard`) against the size and sha256 its manifest records; returns (manifest, files
    checked). A damaged file is a one-line `SourceError` naming it."""
    path = Path(path)
    if not path.is_dir():
        kind = "an ONNX file" if path.suffix == ".onnx" else "not a directory"
        raise SourceError(f"'{path}' is {kind}; sparsify verify OUT checks output directories "
                          "(ONNX files are checked by onnx.checker when written)")
    from ..partition.shards import SHARDS_MANIFEST, is_shard_dir, read_shard_manifest

    if is_shard_dir(path):
        name, data = SHARDS_MANIFEST, read_shard_manifest(path)
    else:
        name, data = MANIFEST, read_output_manifest(path)
        plan_of(data, path / name)
    files = files_of(data, str(path / name))
    if files is None:
        raise SourceError(f"'{path / name}' records no sizes or hashes (written by an older sparsify); "
                          "there is nothing to check the files against")
    return name, check_files(path, files, name, hashes=True)
