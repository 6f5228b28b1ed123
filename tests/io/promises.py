"""The promises every failing command keeps, as assertions: one line on stderr, a non-zero exit,
no traceback, no temporaries left, and every file that existed before unchanged, byte for byte."""

from __future__ import annotations

import os
import re
from pathlib import Path

TEMP = re.compile(r"^\..+\.(tmp|old|probe)-")


def snapshot(*roots: Path) -> dict[str, bytes | str]:
    """Every entry below `roots`: file path -> content, symlink -> 'link:TARGET', dir -> 'dir'."""
    out: dict[str, bytes | str] = {}
    for root in roots:
        root = Path(root)
        if not (root.exists() or root.is_symlink()):
            continue
        entries = [root] if not root.is_dir() or root.is_symlink() else [root, *root.rglob("*")]
        for p in entries:
            if p.is_symlink():
                out[str(p)] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                out[str(p)] = "dir"
            elif p.is_file():
                out[str(p)] = p.read_bytes()
            else:
                out[str(p)] = "special"
    return out


def temporaries(*dirs: Path) -> list[str]:
    """Names of temporaries (`.OUT.tmp-*`, `.OUT.old-*`, `.OUT.probe-*`) in `dirs`."""
    return [str(p) for d in dirs for p in Path(d).iterdir() if TEMP.match(p.name)]


def assert_one_line_failure(code: int, out: str, err: str, match: str | None = None) -> str:
    """A non-zero exit with exactly one line on stderr (returned), and no traceback."""
    assert code != 0, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip() and err.endswith("\n"), repr(err)  # not even a blank line besides
    assert "Traceback" not in err + out, err
    if match is not None:
        assert match in lines[0], lines[0]
    return lines[0]
