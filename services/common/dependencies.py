"""Watching Postgres, Redis (and the object store): health follows what is reachable.

While a dependency is down the service reports NOT_SERVING, and the worker stops taking new
tasks; when it answers again, both recover by themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import redis.asyncio as aioredis

from services.common.db.pool import server_settings
from services.common.grpc_server import Health, wait_any

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[object]]
PROBE_TIMEOUT = 2.0


class PostgresConnection:
    """One connection of its own for the health probe, opened on first use and again after
    it breaks. Probing through the service's pool would report a busy pool as a database that
    is down, and take the service out of its load balancer for being busy."""

    def __init__(self, dsn: str, application_name: str | None = None) -> None:
        self.dsn = dsn
        self.server_settings = server_settings(dsn, application_name)
        self._connection: asyncpg.Connection | None = None

    async def probe(self) -> object:
        try:
            if self._connection is None or self._connection.is_closed():
                self._connection = await asyncpg.connect(
                    self.dsn, timeout=PROBE_TIMEOUT, server_settings=self.server_settings
                )
            return await self._connection.fetchval("SELECT 1", timeout=PROBE_TIMEOUT)
        except BaseException:
            # A probe cut short leaves the connection in an unknown state: start afresh.
            await self.close()
            raise

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.terminate()


def redis_probe(redis: aioredis.Redis) -> Probe:
    async def probe() -> object:
        return await redis.ping()

    return probe


class DependencyMonitor:
    def __init__(
        self,
        probes: dict[str, Probe],
        health: Health | None = None,
        *,
        interval: float = 2.0,
    ) -> None:
        self.probes = probes
        self.health = health
        self.interval = interval
        self.healthy = asyncio.Event()
        self.healthy.set()
        self._wake = asyncio.Event()
        self.down: Sequence[str] = ()

    def report_failure(self) -> None:
        """Something failed talking to a dependency: stop work and probe now."""
        self.healthy.clear()
        self._wake.set()

    async def wait_healthy(self, stop: asyncio.Event) -> bool:
        """Wait until every dependency answers (True) or `stop` is set (False)."""
        await wait_any(self.healthy, stop)
        return self.healthy.is_set()

    async def check(self) -> list[str]:
        """Probe every dependency; returns the names of those down."""
        down = []
        for name, probe in self.probes.items():
            try:
                await asyncio.wait_for(probe(), timeout=PROBE_TIMEOUT)
            except Exception as exc:  # any failure to answer means down; say which and why
                log.warning("dependency down", extra={"dependency": name, "error": repr(exc)})
                down.append(name)
        return down

    async def run(self, stop: asyncio.Event) -> None:
        was_down: list[str] = []
        while not stop.is_set():
            self._wake.clear()
            down = await self.check()
            if stop.is_set():
                return
            if down != was_down:
                if down:
                    log.error("dependencies down: NOT_SERVING", extra={"down": down})
                else:
                    log.info("dependencies back: SERVING")
            was_down = down
            self.down = down
            if self.health is not None:
                await self.health.set(not down)
            if down:
                self.healthy.clear()
            else:
                self.healthy.set()
            # Probe often while something is down, so recovery is noticed quickly.
            await wait_any(stop, self._wake, timeout=self.interval / 4 if down else self.interval)
