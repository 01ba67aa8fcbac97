"""Fixtures for end-to-end tests: an image origin, and stacks stopped after each test."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from testing.origin import ImageOrigin, serve_images
from testing.polling import wait_until
from testing.processes import process_exited
from testing.stack import Stack, start_stack


@pytest.fixture(scope="module")
def database_url(module_database_url: str) -> str:
    """One database per module (tests/conftest.py `module_database_url` says why)."""
    return module_database_url


@pytest.fixture
async def image_origin() -> AsyncIterator[ImageOrigin]:
    async with serve_images((800, 600)) as origin:
        yield origin


@pytest.fixture
def stack_factory() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for stack in started:
        stack.stop()
        wait_until(
            functools.partial(process_exited, stack.process.pid),
            timeout=10,
            message="launcher gone",
        )


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
    stack = start_stack(
        tmp_path,
        {
            "IMGPIPE_DATABASE_URL": database_url,
            "IMGPIPE_REDIS_URL": redis_server_url,
            "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{image_origin.port}",
            **storage_env,
        },
    )
    stack_factory.append(stack)
    return stack
