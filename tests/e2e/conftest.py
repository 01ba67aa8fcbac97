"""Fixtures for end-to-end tests: an image origin, and stacks stopped after each test."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.origin import ImageOrigin, serve_images
from tests.stack import Stack
from tests.support import process_exited, wait_until


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
