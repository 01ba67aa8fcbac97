"""Helpers for tests: polling with a deadline, free ports, throwaway databases and key prefixes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import asyncpg
import redis

from services.common.db.pool import create_pool, migrate

T = TypeVar("T")


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
    high = _ephemeral_low() - max(offsets)
    for _ in range(50):
        base = random.randrange(10000, high)
        if all(free_tcp_port_is(base + offset) for offset in offsets):
            return base
    raise AssertionError("no free block of ports")


def free_tcp_port_is(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns something truthy, and return that.

    Exceptions listed in `ignore` count as "not yet". Raises AssertionError after `timeout`.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            raise AssertionError(_timeout_message(message, timeout, last_error))
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], Awaitable[T | None]],
    # A deadline rather than asyncio.timeout(): the failure names what was awaited, like wait_until.
    timeout: float = 10.0,  # noqa: ASYNC109
    interval: float = 0.05,
    message: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """wait_until() for the event loop: awaits `predicate()` until it gives something truthy."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = await predicate()
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            raise AssertionError(_timeout_message(message, timeout, last_error))
        await asyncio.sleep(interval)


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


def with_database(dsn: str, database: str) -> str:
    """`dsn` with its database name replaced by `database`.

    Handles `postgresql://user:pw@host:port/db?x=y` and the socket form
    `postgresql://postgres@/postgres?host=/path`; a dbname/database query parameter is dropped.
    """
    parts = urlsplit(dsn)
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key in ("dbname", "database") for key, _ in pairs):
        kept = [(key, value) for key, value in pairs if key not in ("dbname", "database")]
        query = urlencode(kept, safe="/")
    # Composed by hand: urlunsplit() drops the "//" of an empty host for schemes it does not
    # know, and "postgresql:///db?host=/sock" must keep it.
    url = f"{parts.scheme}://{parts.netloc}/{quote(database)}"
    if query:
        url += f"?{query}"
    return url


async def create_database(server_url: str, name: str) -> str:
    """Create database `name` on the server at `server_url`; return a DSN for it.

    template0, not template1: the new database is empty whatever was added to template1, and
    copying template0 does not fail while someone else is connected to template1.
    """
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await connection.close()
    return with_database(server_url, name)


async def drop_database(server_url: str, name: str) -> None:
    """Drop database `name`, disconnecting whoever is still connected to it."""
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def delete_keys(redis_url: str, pattern: str) -> int:
    """Delete the keys matching `pattern` with SCAN (never FLUSHALL); return how many."""
    deleted = 0
    client = redis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
    finally:
        client.close()
    return deleted


def _timeout_message(message: str, timeout: float, last_error: BaseException | None) -> str:
    text = f"timed out after {timeout:g} s waiting for {message}"
    if last_error is not None:
        text += f" (last error: {last_error!r})"
    return text


@contextlib.asynccontextmanager
async def own_database(server_url: str, prefix: str) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database of the caller's own, for code that scans every row it finds
    (the reconciler, the webhook dispatcher); dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    url = await create_database(server_url, name)
    pool = await create_pool(url, max_size=6)
    try:
        await migrate(pool)
        yield pool
    finally:
        await pool.close()
        await drop_database(server_url, name)
