"""CPU time per process, and per kind of thread inside the Python services, from /proc.

Where a service spends its CPU tells plumbing from codec work: in a worker, the main thread
runs the event loop (downloads, Redis, Postgres, protobuf), the other Python threads are the
image pool (Pillow), `tokio-*` threads are obstore's storage I/O and the rest is gRPC core.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Groups

TICKS = os.sysconf("SC_CLK_TCK")
# Not Python services: no thread breakdown for them.
_NATIVE = ("postgres", "redis")
MAIN, POOL, STORAGE, GRPC = "main thread", "other Python threads", "obstore (tokio)", "gRPC core"
THREAD_KINDS = (MAIN, POOL, STORAGE, GRPC)


def _stat_ticks(path: str, *, reaped_children: bool = False) -> int:
    try:
        stat = Path(path).read_text()
    except OSError:
        return 0
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    return _stat_ticks(f"/proc/{pid}/stat") / TICKS


def _thread_kind(pid: int, tid: int) -> str:
    if tid == pid:
        return MAIN
    try:
        comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return GRPC
    if comm == "python":
        return POOL
    return STORAGE if comm.startswith("tokio") else GRPC


def _threads(pid: int) -> dict[int, tuple[str, int]]:
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return {}
    return {
        tid: (_thread_kind(pid, tid), _stat_ticks(f"/proc/{pid}/task/{tid}/stat")) for tid in tids
    }


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all cores, every process), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS


@dataclass(frozen=True, slots=True)
class _Process:
    name: str
    ticks: int
    threads: dict[int, tuple[str, int]]


@dataclass
class CpuMeter:
    """CPU seconds per process (and per thread kind) summed over measured intervals."""

    seconds: dict[str, float] = field(default_factory=dict)
    threads: dict[str, dict[str, float]] = field(default_factory=dict)
    wall: float = 0.0
    machine: float = 0.0

    @staticmethod
    def _snapshot(groups: Groups) -> dict[int, _Process]:
        snapshot = {}
        for name, pids in groups.items():
            for pid in pids:
                # Postgres forks a backend per connection and reaps it: the postmaster's
                # cutime keeps the CPU of backends that ended. The bench's keeps its Pillow
                # loops' (B1), whose processes end with each loop.
                reaped = (name == "postgres" and pid == pids[0]) or name.startswith("bench")
                ticks = _stat_ticks(f"/proc/{pid}/stat", reaped_children=reaped)
                threads = {} if name in _NATIVE or name.startswith("bench") else _threads(pid)
                snapshot[pid] = _Process(name, ticks, threads)
        return snapshot

    @contextmanager
    def measure(self, groups: Callable[[], Groups]) -> Iterator[None]:
        """Count the CPU time of the processes `groups()` names, asked at the start and at the
        end, so processes that appear in between (a new Postgres backend) count from zero."""
        before, busy, start = self._snapshot(groups()), machine_busy_seconds(), time.perf_counter()
        yield
        after = self._snapshot(groups())
        self.wall += time.perf_counter() - start
        self.machine += machine_busy_seconds() - busy
        for pid, now in after.items():
            then = before.get(pid, _Process(now.name, 0, {}))
            self.seconds[now.name] = (
                self.seconds.get(now.name, 0.0) + (now.ticks - then.ticks) / TICKS
            )
            if now.threads:
                kinds = self.threads.setdefault(now.name, dict.fromkeys(THREAD_KINDS, 0.0))
                for tid, (kind, ticks) in now.threads.items():
                    kinds[kind] += (ticks - then.threads.get(tid, (kind, 0))[1]) / TICKS

    def stack_seconds(self) -> float:
        """CPU time of the stack itself: every process measured except the bench's own."""
        return sum(used for name, used in self.seconds.items() if not name.startswith("bench"))

    def idle_share(self, cores: int) -> float:
        """The share of the `cores` cores' time over the measured intervals that no process
        used: in a CPU-bound benchmark, a machine stalled on I/O or on its neighbours."""
        capacity = self.wall * cores
        return 1 - self.machine / capacity if capacity else 0.0

    @property
    def others_share(self) -> float:
        """The share of the machine's busy time spent by processes outside imgpipe and bench."""
        return (self.machine - sum(self.seconds.values())) / self.machine if self.machine else 0.0

    def table(self) -> list[dict[str, float | str]]:
        """Rows by CPU used: seconds, % of one core over the wall time, share of the machine;
        "other" is what processes outside the stack and the bench used meanwhile."""
        rows: list[dict[str, float | str]] = []
        ours = sum(self.seconds.values())
        items = sorted(self.seconds.items(), key=lambda item: -item[1])
        for name, used in [*items, ("other (outside imgpipe and bench)", self.machine - ours)]:
            row: dict[str, float | str] = {
                "process": name,
                "cpu_s": round(used, 2),
                "core_percent": round(100 * used / self.wall, 1) if self.wall else 0.0,
                "machine_share_percent": round(100 * used / self.machine, 1)
                if self.machine
                else 0.0,
            }
            for kind, spent in self.threads.get(name, {}).items():
                row[kind] = round(spent, 2)
            rows.append(row)
        return rows
