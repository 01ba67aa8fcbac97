"""Free TCP ports on 127.0.0.1 for the servers tests and benchmarks start."""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Sequence
from pathlib import Path


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, below the ephemeral range
    and not handed out before in this process (free_port_block)."""
    return free_port_block((0,))


def _ephemeral_low() -> int:
    """The lowest port the kernel gives to outgoing connections (and to a bind on port 0)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(offsets: Sequence[int]) -> int:
    """A base port whose base+offset ports are free, below the ephemeral range: a port picked
    inside it can become the source port of any outgoing connection on the machine before the
    service binds it, and under load (the containers of `make image-test` take seconds to
    start) that happened.

    Free is not enough: a stack takes its gateway port and its block of gRPC ports in two
    calls before anything binds either, and both were free, so a random pick could hand out
    one port twice (CI saw ingest crash-loop on the port its own gateway held). A cursor walks
    this process's slice instead, so no port comes back until the whole slice has been used."""
    global _cursor
    low, high = _own_range()
    span = high - low - max(offsets)
    with _lock:
        if _cursor is None or not low <= _cursor < low + span:
            _cursor = random.randrange(low, low + span)
        for _ in range(span):
            base = _cursor
            _cursor = low + (_cursor - low + max(offsets) + 1) % span
            if all(free_tcp_port_is(base + offset) for offset in offsets):
                return base
    raise AssertionError("no free block of ports")


_lock = threading.Lock()
_cursor: int | None = None


def _own_range(low: int = 10000) -> tuple[int, int]:
    """[low, the ephemeral range), one slice per pytest-xdist process. A port is free when it
    is picked; two processes picking the same one before either binds it is a race, which
    gRPC's default SO_REUSEPORT (now off: grpc_transport.py) used to make silent."""
    high = _ephemeral_low()
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    size = (high - low) // count
    return low + index * size, low + (index + 1) * size


def free_tcp_port_is(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
