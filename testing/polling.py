"""Waiting for a condition with a deadline, never a bare sleep: wait_until for plain code,
wait_until_async on an event loop. Both fail with what they waited for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


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


def _timeout_message(message: str, timeout: float, last_error: BaseException | None) -> str:
    text = f"timed out after {timeout:g} s waiting for {message}"
    if last_error is not None:
        text += f" (last error: {last_error!r})"
    return text
