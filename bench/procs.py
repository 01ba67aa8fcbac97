"""What the benchmarks read from /proc about the stack's processes: who they are, their memory.

The stack is `python -m services.local` (the launcher) with its children: gateway, ingest,
status, worker-1..N and the embedded Redis and Postgres. The postmaster and its backends are
grouped through `postmaster.pid` in the stack's data folder.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import PIL

from testing.processes import descendants
from testing.stack import Stack

Groups = dict[str, list[int]]


def stack_processes(stack: Stack) -> Groups:
    """Pids by role: launcher, gateway, ingest, status, worker-1..N, redis, postgres."""
    groups: Groups = {"launcher": [stack.process.pid]}
    for pid in descendants(stack.process.pid):
        name = _role(pid)
        if name:
            groups.setdefault(name, []).append(pid)
    postmaster = _postmaster(stack.data_dir / "pg" / "postmaster.pid")
    if postmaster is not None:
        groups["postgres"] = [postmaster, *descendants(postmaster)]
    return groups


def measured(stack: Stack) -> Groups:
    """The stack's processes and this bench process (the origin, the client, the CSV; and the
    children it has reaped, such as B1's Pillow loops: bench/cpu.py counts them)."""
    return stack_processes(stack) | {"bench (origin, client)": [os.getpid()]}


def _role(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if argv and argv[0].endswith(b"redis-server"):
        return "redis"
    if b"-m" not in argv[:-1]:
        return None
    module = argv[argv.index(b"-m") + 1].decode().removeprefix("services.")
    if module == "worker":
        return _environ(pid).get("IMGPIPE_CONSUMER_NAME", f"worker-{pid}")
    return module


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {name: value for name, _, value in pairs}


def _postmaster(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def memory_mb(pid: int, field_name: str = "VmHWM") -> float | None:
    """A /proc/<pid>/status memory field in MB (10^6 bytes): VmHWM is the lifetime peak RSS."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024 / 1e6
    return None


def peak_rss_mb(stack: Stack) -> dict[str, float]:
    """VmHWM of every service process of the stack, by role (Postgres excluded)."""
    peaks: dict[str, float] = {}
    for name, pids in stack_processes(stack).items():
        if name in ("postgres", "launcher"):
            continue
        values = [mb for mb in map(memory_mb, pids) if mb is not None]
        if values:
            peaks[name] = max(values)
    return peaks


def machine() -> dict[str, object]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    return {
        "cores": os.cpu_count() or 1,
        "cpu": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "loadavg_at_start": os.getloadavg()[0],
    }
