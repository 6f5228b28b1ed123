"""How much memory this process may still use: the system's available memory (psutil), lowered
by a cgroup v2 limit when the process runs in one (containers, CI runners), which psutil does not
see, and by an address-space limit (`ulimit -v`) less what the process has mapped. Jobs that must
hold their output in memory compare their estimate with it before starting."""

from __future__ import annotations

import resource
from pathlib import Path

import psutil

__all__ = ["available_memory"]


def _cgroup_room() -> int | None:
    try:
        line = Path("/proc/self/cgroup").read_text().splitlines()[0]
        group = Path("/sys/fs/cgroup") / line.split("::", 1)[1].lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((group / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None  # no cgroup v2 memory controller here


def available_memory() -> int:
    """Bytes this process can still allocate without swapping or being killed (an estimate)."""
    rooms = [psutil.virtual_memory().available, _cgroup_room()]
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit != resource.RLIM_INFINITY:
        rooms.append(max(limit - psutil.Process().memory_info().vms, 0))
    return min(r for r in rooms if r is not None)
