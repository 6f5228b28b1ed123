"""The layout digest of a native output: sha256 over its plan and its stored tensors' names,
dtypes and shapes, recorded in sparsify.json (`layout_sha256`) by the writer.

Whether a native output's tensors fit its plan is known for sure only by building the plan's
model and comparing names and shapes (`UpcycledOutput.check_fits`, which imports torch and
transformers: seconds). What the writer wrote fits by construction, so a reader that
recomputes the digest from the manifest's plan and the headers, and finds the recorded one,
knows the output is as written without building anything. A missing digest (an output from
before it was recorded) or a different one (the plan or the weights were changed) sends the
reader to the full check, which names what does not fit, or passes an equivalent plan.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from ..io.headers import TensorHeader

__all__ = ["LAYOUT_KEY", "layout_sha256", "as_written"]

LAYOUT_KEY = "layout_sha256"


def layout_sha256(plan: dict[str, Any], headers: Mapping[str, TensorHeader]) -> str:
    """The digest of a stored plan (its JSON form, as sparsify.json holds it) and the stored
    tensors: canonical JSON (sorted keys, no spaces, tensors sorted by name), hashed."""
    tensors = sorted([name, h.dtype, list(h.shape)] for name, h in headers.items())
    text = json.dumps({"plan": plan, "tensors": tensors}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def as_written(manifest: dict[str, Any], headers: Mapping[str, TensorHeader]) -> bool:
    """True when `manifest` records the layout digest of its own plan and of `headers`."""
    recorded = manifest.get(LAYOUT_KEY)
    return isinstance(recorded, str) and recorded == layout_sha256(manifest["plan"], headers)
