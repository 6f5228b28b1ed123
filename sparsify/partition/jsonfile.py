"""Reading the JSON files of this package (stats, placements, shard manifests) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SourceError

__all__ = ["read_json"]


def read_json(path: str | Path, missing: str, fix: str) -> Any:
    """The parsed content of `path`; `SourceError(missing)` when it does not exist, and one
    naming the parse error plus `fix` when it is not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise SourceError(missing) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SourceError(f"'{path}' is not valid JSON ({err}); {fix}") from None
