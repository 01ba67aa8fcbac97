"""How many cores a worker may use: the default of IMGPIPE_WORKER_THREADS.

`os.cpu_count()` counts the machine's cores. In a container with a CPU limit (Kubernetes'
`resources.limits.cpu`, `docker run --cpus`) the process gets that many cores' worth of time,
however many the node has: codec threads beyond it only wait their turn, each holding a decoded
image while it waits. The limit is the cgroup's CPU quota: `cpu.max` under cgroup v2 ("200000
100000": 2 cores; "max": none), `cpu.cfs_quota_us` over `cpu.cfs_period_us` under v1 (-1: none).
A fractional limit rounds up: 1.5 cores keep two threads busy.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may run on (its affinity), capped by its cgroup's CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU limit in cores, None when there is none or it cannot be read."""
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        fields = v2.split()
        if len(fields) == 2 and fields[0] != "max":
            return _ratio(fields[0], fields[1])
        return None
    for folder in ("cpu", "cpu,cpuacct"):
        quota = _read(root / folder / "cpu.cfs_quota_us")
        period = _read(root / folder / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return _ratio(quota, period)
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        used, window = int(quota), int(period)
    except ValueError:
        return None
    return used / window if used > 0 and window > 0 else None
