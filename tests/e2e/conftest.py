"""Fixtures for end-to-end tests: an image origin, and stacks stopped after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from testing.origin import ImageOrigin, serve_images, serve_images_in_thread
from testing.stack import Stack, StartStack, live_stack, stack_running


@pytest.fixture(scope="module")
def database_url(module_database_url: str) -> str:
    """One database per module (tests/conftest.py `module_database_url` says why)."""
    return module_database_url


@pytest.fixture
async def image_origin() -> AsyncIterator[ImageOrigin]:
    async with serve_images((800, 600)) as origin:
        yield origin


@pytest.fixture(scope="module")
def module_origin() -> Iterator[ImageOrigin]:
    """An image origin for the whole module, in a thread (it outlives each test's loop)."""
    with serve_images_in_thread((800, 600)) as origin:
        yield origin


@pytest.fixture(scope="module")
def module_stack(
    tmp_path_factory: pytest.TempPathFactory,
    database_url: str,
    redis_server_url: str,
    module_origin: ImageOrigin,
) -> Iterator[Stack]:
    """One stack for the tests of a module that need no settings of their own, allowed to
    fetch from module_origin (each test uses image paths of its own). Starting a stack costs
    seconds of both cores; tests that only need a running one share it."""
    folder = tmp_path_factory.mktemp("module-stack")
    with stack_running(folder, database_url, redis_server_url, module_origin.port) as stack:
        yield stack


@pytest.fixture
def stack_factory() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for stack in started:
        stack.stop_and_reap()


@pytest.fixture
def start_live_stack(
    tmp_path: Path, database_url: str, redis_server_url: str, stack_factory: list[Stack]
) -> StartStack:
    """Starts a stack (testing.stack.live_stack) on the module's database and the session's
    Redis, allowed to fetch from `origins` (ports on 127.0.0.1), with `extra` IMGPIPE_*
    variables; every stack it starts is stopped after the test."""

    def start(*origins: int, **extra: str) -> Stack:
        return live_stack(
            tmp_path,
            database_url,
            redis_server_url,
            stack_factory,
            *origins,
            **extra,
        )

    return start


@pytest.fixture
def origin_stack(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    image_origin: ImageOrigin,
    stack_factory: list[Stack],
    storage_env: dict[str, str],
) -> Stack:
    """The stack on the session's database and Redis, allowed to fetch from image_origin, with
    the object store storage_env chooses (file:// unless a test parametrizes it)."""
    # live_stack() itself, not start_live_stack: tests/lifecycle and tests/browser take this
    # fixture and its three dependencies from here, and nothing more.
    return live_stack(
        tmp_path, database_url, redis_server_url, stack_factory, image_origin.port, **storage_env
    )
