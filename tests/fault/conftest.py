"""Fixtures of the fault tests: each test gets its own Postgres, Redis, image origin and
services, because the test stops and restarts them."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from testing import containers
from testing.origin import ImageOrigin, serve_images
from tests.fault.harness import Backends, Services


@pytest.fixture
def backends(request: pytest.FixtureRequest) -> Iterator[Backends]:
    # Not tmp_path: as root, Postgres runs as the "pgserver" user, and a pytest session that
    # starts meanwhile makes /tmp/pytest-of-root private again. A short folder also keeps the
    # socket paths, and so the URLs, the same across restarts.
    if containers.in_use():
        # Containers of the test's own: the session's sweep and finalizer cover them too.
        request.getfixturevalue("container_reaper")
    root = Path(tempfile.mkdtemp(prefix="imgpipe-fault-"))
    servers = Backends(root, prefix=f"imgpipe-fault-{secrets.token_hex(4)}")
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
