"""Free TCP ports on 127.0.0.1 for the servers tests and benchmarks start."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Sequence
from pathlib import Path


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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
    start) that happened."""
    low, high = _own_range()
    for _ in range(50):
        base = random.randrange(low, high - max(offsets))
        if all(free_tcp_port_is(base + offset) for offset in offsets):
            return base
    raise AssertionError("no free block of ports")


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
