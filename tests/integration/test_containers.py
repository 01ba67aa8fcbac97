"""The servers of `make test-containers`: the deployed majors, and nothing left behind.

Skipped unless the session's servers are containers (a Docker-compatible engine answers and no
server URL is given): the embedded stand-ins are other versions.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import asyncpg
import docker
import pytest
import redis.asyncio

from testing import containers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not containers.in_use(), reason="the servers are not containers"),
]


@pytest.fixture
def client() -> Iterator[Any]:
    found = docker.from_env()
    try:
        yield found
    finally:
        found.close()


async def test_postgres_is_the_deployed_major(postgres_server_url: str) -> None:
    connection = await asyncpg.connect(postgres_server_url)
    try:
        version = await connection.fetchval("SHOW server_version")
    finally:
        await connection.close()
    assert version.split(".")[0] == containers.versions()["POSTGRES_MAJOR"]


async def test_redis_is_the_deployed_major(redis_client: redis.asyncio.Redis) -> None:
    info = await redis_client.info("server")
    assert str(info["redis_version"]).split(".")[0] == containers.versions()["REDIS_MAJOR"]


def test_sweep_removes_containers_of_dead_runs_only(client: Any) -> None:
    # A process that has exited stands for a test run killed before its teardown.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner = containers.owner(gone.pid)
    gone.wait()
    image = f"redis:{containers.versions()['REDIS_MAJOR']}"
    made = []
    try:
        for owner in (dead_owner, containers.owner()):
            made.append(
                client.containers.create(
                    image, ["true"], network_mode="host", labels={containers.OWNER_LABEL: owner}
                )
            )
        orphan, ours = made
        removed = containers.sweep_dead_owners()
        remaining = {c.id for c in client.containers.list(all=True)}
        assert orphan.name in removed and orphan.id not in remaining
        assert ours.id in remaining, "a container of a live run was removed"
    finally:
        for container in made:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
