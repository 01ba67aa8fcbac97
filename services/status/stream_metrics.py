"""The status service's view of the streams for Prometheus: lag, pending and the age of the
oldest unacknowledged entry of each consumer group, the dead letters, and the backlog.

The metric names are part of the contract listed in services/common/metrics.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError, ResponseError

from services.common.servicer_errors import BACKEND_ERRORS

log = logging.getLogger(__name__)

LAG_SCAN_LIMIT = 10_000


class StreamStats(Collector):
    """Lag and pending of consumer groups, and the dead-letter stream's length, read from Redis
    every `interval` seconds by `run` and reported at scrape time from the last reading.

    Every status replica reports the same values: read them with max(), never sum().
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        groups: Sequence[tuple[str, str]],
        dead_letters: str,
        *,
        interval: float = 15.0,
        backlog: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.redis = redis
        self.groups = list(groups)
        self.dead_letters = dead_letters
        self.interval = interval
        # The backlog lives in Postgres (docs/scheduling.md): the stream holds only a window.
        self.backlog = backlog
        # Replaced whole by each reading, so a scrape (another thread) sees one reading.
        self._groups: list[tuple[str, str, int, int, float | None]] = []
        self._dead: int | None = None
        self._backlog: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """A service loop: registered while it runs, refreshed until `stop` is set."""
        REGISTRY.register(self)
        try:
            while not stop.is_set():
                try:
                    await self.refresh()
                except (RedisError, OSError) as exc:
                    # No values rather than stale ones: absent() alerts notice.
                    self._groups, self._dead = [], None
                    log.warning("stream metrics not refreshed", extra={"error": repr(exc)})
                await self._refresh_backlog()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            REGISTRY.unregister(self)

    async def refresh(self) -> None:
        readings = []
        now_ms = await _redis_time_ms(self.redis)
        for stream, group in self.groups:
            lag, pending = await group_state(self.redis, stream, group)
            oldest = await oldest_unacknowledged(self.redis, stream, group)
            age = None if oldest is None else max(now_ms - oldest, 0) / 1000
            readings.append((stream, group, lag, pending, age))
        dead = int(await self.redis.xlen(self.dead_letters))
        self._groups, self._dead = readings, dead

    async def _refresh_backlog(self) -> None:
        if self.backlog is None:
            return
        try:
            self._backlog = await self.backlog()
        except BACKEND_ERRORS as exc:
            self._backlog = None
            log.warning("backlog metric not refreshed", extra={"error": repr(exc)})

    def collect(self) -> Iterable[Metric]:
        readings, dead, backlog = self._groups, self._dead, self._backlog
        if backlog is not None:
            yield GaugeMetricFamily(
                "imgpipe_backlog_images",
                "Images accepted and not yet final, counted in Postgres",
                value=backlog,
            )
        lag = GaugeMetricFamily(
            "imgpipe_stream_lag",
            "Stream entries not yet delivered to the consumer group",
            labels=["stream", "group"],
        )
        pending = GaugeMetricFamily(
            "imgpipe_stream_pending",
            "Stream entries delivered to the consumer group and not yet acknowledged",
            labels=["stream", "group"],
        )
        oldest = GaugeMetricFamily(
            "imgpipe_stream_oldest_age_seconds",
            "Age of the oldest entry the consumer group has not acknowledged (0: none)",
            labels=["stream", "group"],
        )
        for stream, group, lag_value, pending_value, age in readings:
            lag.add_metric([stream, group], lag_value)
            pending.add_metric([stream, group], pending_value)
            oldest.add_metric([stream, group], age or 0.0)
        yield lag
        yield pending
        yield oldest
        if dead is not None:
            yield GaugeMetricFamily(
                "imgpipe_dead_letter_entries", "Tasks in the dead-letter stream", value=dead
            )


async def group_state(redis: aioredis.Redis, stream: str, group: str) -> tuple[int, int]:
    """(lag, pending) of `group` on `stream`. A group not created yet will be delivered every
    entry (groups start at the beginning); a missing stream has neither."""
    try:
        groups: Any = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream
        return 0, 0
    for info in groups:
        if _text(info["name"]) != group:
            continue
        lag = info.get("lag")
        if lag is None:
            # Redis before 7 has no lag field (and 7 reports none after some deletions).
            lag = await entries_after(redis, stream, _text(info["last-delivered-id"]))
        return int(lag), int(info["pending"])
    return int(await redis.xlen(stream)), 0


async def oldest_unacknowledged(redis: aioredis.Redis, stream: str, group: str) -> int | None:
    """When (ms since the epoch, from its entry id) the oldest entry of `stream` that `group`
    has not acknowledged was added: the oldest pending one or the first not yet delivered.
    None when there is none (or no such stream or group)."""
    try:
        groups: Any = await redis.xinfo_groups(stream)
        summary: Any = await redis.xpending(stream, group)
    except ResponseError:  # no such stream or group
        return None
    delivered = next((g["last-delivered-id"] for g in groups if _text(g["name"]) == group), None)
    if delivered is None:
        return None
    ids = [_text(summary["min"])] if summary["pending"] else []
    waiting: Any = await redis.xrange(stream, min=f"({_text(delivered)}", max="+", count=1)
    ids += [_text(entry_id) for entry_id, _ in waiting]
    return min((int(entry_id.split("-")[0]) for entry_id in ids), default=None)


async def _redis_time_ms(redis: aioredis.Redis) -> int:
    # Redis's clock, which stamped the entry ids: a skewed local clock cannot make ages up.
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def entries_after(redis: aioredis.Redis, stream: str, entry_id: str) -> int:
    """How many entries of `stream` come after `entry_id`, counted up to LAG_SCAN_LIMIT."""
    entries: Any = await redis.xrange(stream, min=f"({entry_id}", max="+", count=LAG_SCAN_LIMIT)
    return len(entries)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
