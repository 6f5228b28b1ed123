"""Whether a dense model is the source an output was made from, by what its sparsify.json records.

An output records its source as {"spec", "kind", "xxh3_128": {weight file name: digest}} (see
`Source.describe`; outputs written before record "sha256" instead, and are checked by it). A
dense directory or hub snapshot is the recorded source when its weight files hash to exactly
those values; a demo when it is the same demo (demos are seeded). An output made
from an in-memory model, or one that records no hashes, cannot tell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import OptionError
from .io.sources import FINGERPRINT, Source, fingerprint_files, sha256_files

__all__ = ["SourceCheck", "check_source", "check_architecture"]


@dataclass(frozen=True)
class SourceCheck:
    """`same`: True (it is the recorded source), False (it is not) or None (cannot know); `line` says which and why."""

    same: bool | None
    line: str


def check_source(recorded: Any, dense: Source) -> SourceCheck:
    """Compare `dense` with the source an output records (its sparsify.json "source" entry)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("spec"), str):
        return SourceCheck(None, "the output records no source, so whether DENSE is its source cannot be known")
    spec, kind = recorded["spec"], recorded.get("kind")
    algorithm = FINGERPRINT if FINGERPRINT in recorded else "sha256"
    hashes = recorded.get(algorithm)
    if kind == "demo" and dense.kind == "demo":  # demos are seeded: the same name, the same weights
        same = spec == dense.spec
        return SourceCheck(same, f"DENSE {'is' if same else 'is not'} the recorded source ({spec})")
    if kind == "module":
        return SourceCheck(None, f"the output was made from an in-memory model ({spec}), so whether DENSE is its "
                                 "source cannot be known")
    if kind == "demo" or dense.kind == "demo":
        return SourceCheck(None, f"the output records {spec} and DENSE is {dense.spec}; whether they hold the same "
                                 "weights cannot be known without hashes on both sides")
    if dense.path is None or not isinstance(hashes, dict) or not hashes:
        return SourceCheck(None, f"the output records no hashes of its source ({spec}), so whether DENSE is it "
                                 "cannot be known")
    got = (fingerprint_files if algorithm == FINGERPRINT else sha256_files)(dense.files)
    if got == hashes:
        return SourceCheck(True, f"DENSE is the recorded source (its {len(got)} weight file(s) have the {algorithm} "
                                 "that sparsify.json records)")
    return SourceCheck(False, f"DENSE is not the recorded source {spec}: the {algorithm} of its weight files differ "
                              "from those sparsify.json records")


def _site_width(dense: Any, site: Any) -> int | None:
    """The input width of the dense FFN at `site`, from its first projection's weight (an FFN may
    be narrower than the model: LiLT's layout stream, a squeeze-excitation block)."""
    name = getattr(site, "weights", {}).get("w1")
    try:
        shape = tuple(dense.get_parameter(name).shape) if name else None
    except AttributeError:
        return None
    if not shape or len(shape) < 2:
        return None
    layout = getattr(site, "layout", "linear")
    if layout == "conv1d":  # GPT-2's Conv1D: [in, out]
        return shape[0]
    return shape[1] * (site.groups.get("w1", 1) if layout == "conv1x1" else 1)


def check_architecture(dense: Any, plan: Any, spec: str, source_model_type: str | None = None) -> None:
    """An `OptionError` when `dense` is of another model type than `source_model_type` (what a
    native output's config records), or lacks a module, or has another width, than the plan's
    sites name: it is another architecture (or size) than the output was made from."""
    model_type = getattr(getattr(dense, "config", None), "model_type", None)
    if source_model_type and model_type and model_type != source_model_type:
        raise OptionError(f"DENSE '{spec}' is a {model_type} model but the output was made from a "
                          f"{source_model_type} model; pass the dense model it was upcycled from")
    for site in plan.selected_sites:
        try:
            dense.get_submodule(site.path)
        except AttributeError:
            raise OptionError(f"DENSE '{spec}' ({type(dense).__name__}) has no module '{site.path}' that the output's "
                              "plan converts: it is another architecture than the output was made from; pass the "
                              "dense model it was upcycled from") from None
        hidden = getattr(site, "hidden_size", None)
        width = _site_width(dense, site)
        if width is None:  # no weight to read the width from: the model's own
            width = getattr(getattr(dense, "config", None), "hidden_size", None)
        if hidden is not None and width is not None and hidden != width:
            raise OptionError(f"DENSE '{spec}' has hidden size {width} but the output's plan was made for {hidden}; "
                              "pass the dense model it was upcycled from")
