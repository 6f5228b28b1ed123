"""Finding a hub model in the local Hugging Face cache under its other name.

The hub renamed its first models into organisations (`t5-base` is now `google-t5/t5-base`,
`gpt2` is `openai-community/gpt2`) and redirects the old ids, but the cache stores a model
under the id it was downloaded by, and neither huggingface_hub nor transformers ships the
table of old and new names. So an id that is not cached is matched against the cached models
by repository name: a legacy id (no organisation) finds `ORG/NAME`, and `ORG/NAME` finds a
legacy `NAME`. The cache is read with huggingface_hub's `scan_cache_dir`.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import SourceError

__all__ = ["cached_models", "cached_alias", "describe_cache", "repo_of_snapshot"]

_LISTED = 8


def cached_models() -> list[str]:
    """Ids of the models in the Hugging Face cache (HF_HUB_CACHE), sorted; [] without a cache."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        # The cache snapshot_download reads (scan_cache_dir's own default is bound at its import).
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except (CacheNotFound, OSError):
        return []
    return sorted(r.repo_id for r in info.repos if r.repo_type == "model")


def cached_alias(repo_id: str) -> str | None:
    """The cached model that `repo_id` names under its legacy or its current id, if one does;
    a `SourceError` when several could be meant."""
    org, _, name = repo_id.rpartition("/")
    matches = [m for m in cached_models()
               if m != repo_id and m.rpartition("/")[2].lower() == name.lower() and (not org or "/" not in m)]
    if len(matches) > 1:
        raise SourceError(f"'{repo_id}' is not in the Hugging Face cache, and several cached models have its name: "
                          f"{', '.join(matches)}; pass one of them")
    return matches[0] if matches else None


def describe_cache(repo_id: str) -> str:
    """What the cache holds, for an error about `repo_id`: its closest ids, else a few of them."""
    from huggingface_hub import constants

    held = cached_models()
    if not held:
        return f"the cache ({constants.HF_HUB_CACHE}) holds no models"
    close = difflib.get_close_matches(repo_id, held, n=3, cutoff=0.5)
    shown = close or held[:_LISTED]
    more = "" if close or len(held) <= _LISTED else f" and {len(held) - _LISTED} more"
    label = "the closest cached models are" if close else f"the cache ({constants.HF_HUB_CACHE}) holds"
    return f"{label} {', '.join(shown)}{more}"


def repo_of_snapshot(path: str | Path) -> str | None:
    """The repo id of a cache snapshot directory (.../models--ORG--NAME/snapshots/REV), else None."""
    parts = Path(path).parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not parts[-3].startswith("models--"):
        return None
    return parts[-3][len("models--"):].replace("--", "/")
