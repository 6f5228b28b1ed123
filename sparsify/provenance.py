"""Whether a dense model is the source an output was made from, by what its sparsify.json records.

An output records its source as {"spec", "kind", "sha256": {weight file name: sha256}} (see
`Source.describe`). A dense directory or hub snapshot is the recorded source when its weight files
hash to exactly those values; a demo when it is the same demo (demos are seeded). An output made
from an in-memory model, or one that records no hashes, cannot tell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .io.sources import Source, sha256_files

__all__ = ["SourceCheck", "check_source"]


@dataclass(frozen=True)
class SourceCheck:
    """`same`: True (it is the recorded source), False (it is not) or None (cannot know); `line` says which and why."""

    same: bool | None
    line: str


def check_source(recorded: Any, dense: Source) -> SourceCheck:
    """Compare `dense` with the source an output records (its sparsify.json "source" entry)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("spec"), str):
        return SourceCheck(None, "the output records no source, so whether DENSE is its source cannot be known")
    spec, kind, hashes = recorded["spec"], recorded.get("kind"), recorded.get("sha256")
    if kind == "demo" or dense.kind == "demo":
        if kind == dense.kind:
            same = spec == dense.spec
            return SourceCheck(same, f"DENSE {'is' if same else 'is not'} the recorded source ({spec})")
        return SourceCheck(False, f"DENSE is not the recorded source: the output was made from {spec}")
    if dense.path is None or not isinstance(hashes, dict) or not hashes:
        return SourceCheck(None, f"the output records no hashes of its source ({spec}), so whether DENSE is it "
                                 "cannot be known")
    got = sha256_files(dense.files)
    if got == hashes:
        return SourceCheck(True, f"DENSE is the recorded source (its {len(got)} weight file(s) have the sha256 "
                                 "that sparsify.json records)")
    return SourceCheck(False, f"DENSE is not the recorded source {spec}: the sha256 of its weight files differ "
                              "from those sparsify.json records")
