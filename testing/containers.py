"""Postgres and Redis in containers, through testcontainers, when a Docker engine answers.

The images are the majors of deploy/versions.env, by their official names (`postgres:17`,
`redis:7`): a Docker engine with registry access pulls the official images, and podman finds
the ones `make test-images` built from Debian's packages (tagged localhost/...). Both take the
same command line.

Every container uses the host's network and listens on 127.0.0.1 only, on a port picked here:
nothing crosses a bridge to a container address. Ryuk, testcontainers' reaper, is an image that
cannot be pulled everywhere, so it is off; this module removes what it starts instead:
- each server when its fixture ends (the context managers below),
- all of this process's containers when the session ends (remove_own),
- at the start of a session, those of test processes that are gone (sweep_dead_owners), such
  as a run killed with SIGKILL. Containers of a run still going on are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis

from testing.polling import wait_until
from testing.ports import free_port_block

# Read by testcontainers when it is imported: set before the first import below.
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

VERSIONS_FILE = Path(__file__).resolve().parents[1] / "deploy" / "versions.env"
OWNER_LABEL = "org.imgpipe.test-owner"
START_TIMEOUT = 90.0


def versions() -> dict[str, str]:
    """deploy/versions.env: the Postgres and Redis majors, named once for images and tests."""
    found: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


def in_use() -> bool:
    """True when the session's servers come from containers (tests/conftest.py's order)."""
    from services.local.embedded import docker_available

    given = ("IMGPIPE_TEST_DATABASE_URL", "IMGPIPE_TEST_REDIS_URL")
    return not any(os.environ.get(name) for name in given) and docker_available()


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return stat.rpartition(")")[2].split()[19]


def owner(pid: int | None = None) -> str:
    """`host:pid:start`: which test process a container belongs to, surviving pid reuse."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def _owner_alive(value: str) -> bool:
    host, _, rest = value.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname():
        return True  # another machine's run on a shared engine: not ours to judge
    return pid.isdigit() and _process_start(int(pid)) == start


def _client() -> Any:
    import docker

    return docker.from_env()


def sweep_dead_owners() -> list[str]:
    """Remove the containers of test processes that no longer run; return their names."""
    return _remove(OWNER_LABEL, lambda labels: not _owner_alive(labels.get(OWNER_LABEL, "")))


def remove_own() -> list[str]:
    """Remove every container this process started and still has; return their names."""
    return _remove(f"{OWNER_LABEL}={owner()}", lambda labels: True)


def _remove(label_filter: str, doomed: Callable[[dict[str, str]], bool]) -> list[str]:
    """Remove the containers, running or not, that carry `label_filter` and whose labels
    `doomed` picks; return their names."""
    client = _client()
    removed = []
    try:
        for container in client.containers.list(all=True, filters={"label": label_filter}):
            if doomed(container.labels):
                container.remove(force=True, v=True)
                removed.append(container.name)
    finally:
        client.close()
    return removed


@dataclass
class Server:
    """A server container: its URL, and stop/start for tests that take the server away. The
    URL stays the same: the port is the container's own on the host's network."""

    url: str
    container: Any
    ready: Callable[[], None]

    def stop(self) -> None:
        """The image's stop signal (Postgres: SIGINT, a fast shutdown), SIGKILL after 30 s."""
        self.container.get_wrapped_container().stop(timeout=30)

    def start(self) -> None:
        """Start the stopped container again; return once the server accepts connections."""
        self.container.get_wrapped_container().start()
        _wait_ready(self.container, self.ready)


def _container(image: str, command: list[str]) -> Any:
    from testcontainers.core.container import DockerContainer

    # The host's network: the server binds 127.0.0.1 itself, and no port is published.
    return (
        DockerContainer(image)
        .with_command(command)
        .with_kwargs(network_mode="host", labels={OWNER_LABEL: owner()})
    )


_NOT_UP = (OSError, asyncpg.PostgresError, redis.RedisError)


class _Exited(AssertionError):
    """The container stopped before its server accepted a connection."""


def _wait_ready(container: Any, ready: Callable[[], None]) -> None:
    """Poll `ready()` (a real connection) until it succeeds; fail with the container's log."""

    def up() -> bool:
        try:
            ready()
        except _NOT_UP as exc:
            wrapped = container.get_wrapped_container()
            wrapped.reload()
            if wrapped.status == "exited":
                raise _Exited(_not_ready(container, exc)) from exc
            raise
        return True

    try:
        wait_until(
            up,
            timeout=START_TIMEOUT,
            interval=0.2,
            message=f"{container.image} to accept connections",
            ignore=_NOT_UP,
        )
    except _Exited:
        raise
    except AssertionError as exc:
        raise AssertionError(_not_ready(container, exc)) from None


def _not_ready(container: Any, reason: BaseException) -> str:
    logs = container.get_wrapped_container().logs().decode(errors="replace")[-2000:]
    return f"{container.image} not ready ({reason}):\n{logs}"


@contextlib.contextmanager
def postgres_server() -> Iterator[Server]:
    """postgres:<major> on 127.0.0.1:<free port>; removed when the block ends."""
    port = free_port_block((0,))
    password = secrets.token_hex(12)
    url = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"
    container = _container(
        f"postgres:{versions()['POSTGRES_MAJOR']}",
        ["postgres", "-c", "listen_addresses=127.0.0.1", "-c", f"port={port}"],
    ).with_env("POSTGRES_PASSWORD", password)

    def ready() -> None:
        async def connect() -> None:
            connection = await asyncpg.connect(url, timeout=5)
            await connection.close()

        asyncio.run(connect())

    with _started(container, ready):
        yield Server(url, container, ready)


@contextlib.contextmanager
def redis_server() -> Iterator[Server]:
    """redis:<major> on 127.0.0.1:<free port>, nothing persisted; removed when the block ends."""
    port = free_port_block((0,))
    url = f"redis://127.0.0.1:{port}/0"
    container = _container(
        f"redis:{versions()['REDIS_MAJOR']}",
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no"],
    )  # fmt: skip

    def ready() -> None:
        with redis.Redis.from_url(url, socket_timeout=5) as client:
            client.ping()

    with _started(container, ready):
        yield Server(url, container, ready)


@contextlib.contextmanager
def _started(container: Any, ready: Callable[[], None]) -> Iterator[None]:
    try:
        container.start()
        _wait_ready(container, ready)
        yield
    finally:
        # Also when start() or the wait failed: a created container is removed all the same.
        with contextlib.suppress(Exception):
            container.stop()
