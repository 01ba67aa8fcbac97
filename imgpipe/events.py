"""Live progress: the Server-Sent Events of GET /requests/{id}/events, followed to the end.

The gateway sends `progress` events, then one `final` event, then ends the stream; when it
loses its own backend mid-stream it sends an `error` event first. Every new connection starts
with the request's current state, so reconnecting loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol

from imgpipe.errors import ApiError

MAX_ATTEMPTS = 5
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 5.0

Event = tuple[str, dict[str, Any]]


class SseParser:
    """Turns the lines of an event stream into (event name, data) pairs.

    Feed it one line at a time (with or without its line ending); it returns the event that a
    blank line completes, else None. Comments (`: keep-alive`), `id:` and `retry:` are skipped,
    several `data:` lines are joined with newlines, and data that is not a JSON object is
    given as `{"data": text}`.
    """

    def __init__(self) -> None:
        self._name = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        line = line.rstrip("\r\n")
        if not line:
            name, data = self._name or "message", self._data
            self._name, self._data = "", []
            return (name, _decode("\n".join(data))) if data else None
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        return None


def _decode(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {"data": text}
    return value if isinstance(value, dict) else {"data": value}


class EventSource(Protocol):
    def events(self, request_id: str) -> AsyncGenerator[Event, None]: ...


def final_count(data: dict[str, Any]) -> int:
    """Images that are final (done or failed) in a progress or final event."""
    progress = data.get("progress") or {}
    return int(progress.get("images_done") or 0) + int(progress.get("images_failed") or 0)


def backoff(failures: int) -> float:
    """Seconds to wait before reconnecting after `failures` fruitless attempts in a row."""
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(failures - 1, 0)))


async def follow(
    source: EventSource,
    request_id: str,
    on_event: Callable[[dict[str, Any]], None],
    *,
    max_attempts: int = MAX_ATTEMPTS,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> dict[str, Any]:
    """Follow the request's events until `final`, and return the final event's data.

    `on_event` gets the data of every progress event and of the final one. When the stream
    drops before `final` (no answer, a timeout, a 502/503/504, an `error` event, or the stream
    just ending), it reconnects after a growing pause; after a `reconnect` event (the end of a
    stream's time limit) after the shortest pause, and that counts as no failure. It gives up,
    raising the last ApiError, after `max_attempts` connections in a row that brought no new
    image to a final state.
    Other error answers (404, 401...) are raised at once.
    """
    failures = 0
    best = -1
    last_error: ApiError | None = None
    while True:
        progressed = False
        try:
            async with contextlib.aclosing(source.events(request_id)) as stream:
                async for name, data in stream:
                    if name == "reconnect":
                        progressed = True  # a stream's time is up: no failure
                        break
                    if name == "error":
                        break  # the server lost its backend: reconnect
                    if name not in ("progress", "final"):
                        continue
                    on_event(data)
                    if name == "final":
                        return data
                    if final_count(data) > best:
                        best, progressed = final_count(data), True
        except ApiError as exc:
            if not exc.retryable:
                raise
            last_error = exc
        # A connection that moved the request forward starts a new count.
        failures = 1 if progressed else failures + 1
        if failures >= max_attempts:
            raise last_error or _dropped(max_attempts)
        await sleep(backoff(failures))


def _dropped(attempts: int) -> ApiError:
    return ApiError(
        None,
        "unavailable",
        f"the progress stream ended {attempts} times in a row before the request was final",
    )
