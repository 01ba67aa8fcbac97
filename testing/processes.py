"""Processes seen from /proc: whether one has exited, and which ones it started."""

from __future__ import annotations

import os
from pathlib import Path


def process_exited(pid: int) -> bool:
    """True once `pid` is gone, or is a zombie (it has exited; only the reaping is missing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...), from /proc."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(children)
            frontier.extend(children)
    return found
