"""Fixtures of the fault tests: each test gets its own image origin and services, because
the test kills them, and its own database and key prefix. A test marked own_servers, because it
stops or restarts Postgres or Redis, gets a Postgres and a Redis of its own too."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from testing import containers
from testing.databases import delete_keys
from testing.origin import ImageOrigin, serve_images
from tests.fault.harness import Backends, Services


@pytest.fixture
def backends(request: pytest.FixtureRequest) -> Iterator[Backends]:
    prefix = f"imgpipe-fault-{secrets.token_hex(4)}"
    if request.node.get_closest_marker("own_servers") is None:
        # The test kills services, never the servers: the session's servers, with a database
        # and a key prefix of the test's own, spare it starting two servers (and an initdb).
        database_url: str = request.getfixturevalue("own_database_url")
        redis_url: str = request.getfixturevalue("redis_server_url")
        try:
            yield Backends(None, prefix, shared=(database_url, redis_url))
        finally:
            delete_keys(redis_url, f"{prefix}:*")
        return
    # Not tmp_path: as root, Postgres runs as the "pgserver" user, and a pytest session that
    # starts meanwhile makes /tmp/pytest-of-root private again. A short folder also keeps the
    # socket paths, and so the URLs, the same across restarts.
    if containers.in_use():
        # Containers of the test's own: the session's sweep and finalizer cover them too.
        request.getfixturevalue("container_reaper")
    root = Path(tempfile.mkdtemp(prefix="imgpipe-fault-"))
    servers = Backends(root, prefix)
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture
async def origin() -> AsyncIterator[ImageOrigin]:
    # Small images and some latency: processing spreads over a few seconds, so faults land
    # in the middle of it.
    async with serve_images((160, 120), delay=0.02) as images:
        yield images


@pytest.fixture
async def services(
    backends: Backends, origin: ImageOrigin, tmp_path: Path
) -> AsyncIterator[Services]:
    started = Services(backends, origin, tmp_path)
    try:
        yield started
    finally:
        await started.close()
