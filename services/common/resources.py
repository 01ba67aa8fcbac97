"""Opening the shared resources of a backend service, closed in reverse order on exit."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
import redis.asyncio as aioredis

from services.common import failpoints, metrics, telemetry
from services.common.config import CommonSettings, ConfigError
from services.common.db.pool import create_pool, migrate
from services.common.dependencies import (
    DependencyMonitor,
    PostgresConnection,
    Probe,
    redis_probe,
)
from services.common.grpc_server import Health
from services.common.json_logs import configure_logging
from services.common.streams import StreamNames

log = logging.getLogger(__name__)

S = TypeVar("S")


def load_settings(
    service: str, from_env: Callable[[Mapping[str, str]], S], environ: Mapping[str, str]
) -> S:
    """Settings from the environment, or exit 2 listing every problem (before any logging)."""
    try:
        return from_env(environ)
    except ConfigError as exc:
        print(f"{service}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass(frozen=True, slots=True)
class Backends:
    pool: asyncpg.Pool
    redis: aioredis.Redis
    names: StreamNames
    # The health probe's own connection: a pool that callers keep busy is not a database that
    # is down, and must not turn the service NOT_SERVING.
    probe_connection: PostgresConnection

    def monitor(self, health: Health, **extra: Probe) -> DependencyMonitor:
        """Watches Postgres and Redis (and `extra`) and drives `health` accordingly."""
        probes = {
            "postgres": self.probe_connection.probe,
            "redis": redis_probe(self.redis),
            **extra,
        }
        return DependencyMonitor(probes, health)


def redis_client(url: str, timeout: float) -> aioredis.Redis:
    """The services' Redis client: a command unanswered for `timeout` seconds, or a connection
    not made in that time, raises redis.exceptions.TimeoutError (a backend error: the caller
    retries, as for an outage) instead of waiting for TCP to give up."""
    return aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


@contextlib.asynccontextmanager
async def open_backends(service: str, common: CommonSettings) -> AsyncIterator[Backends]:
    """Logging, /metrics (when IMGPIPE_METRICS_LISTEN is set), traces (when imgpipe[otel] is
    installed and OTEL_* asks), the Postgres pool (migrated) and the Redis client, for the
    service's lifetime."""
    configure_logging(service, common.log_level)
    failpoints.arm(common.failpoints)
    # The OTEL_* variables are the SDK's own (its exporters read them too), not imgpipe settings.
    with metrics.serving(common.metrics_listen), telemetry.configure(service, os.environ):
        pool = await create_pool(
            common.database_url,
            max_size=common.db_pool_size,
            acquire_timeout=common.db_acquire_timeout,
            command_timeout=common.db_command_timeout,
            application_name=f"imgpipe-{service}",
        )
        probe_connection = PostgresConnection(common.database_url, f"imgpipe-{service}-probe")
        try:
            await migrate(pool)
            redis = redis_client(common.redis_url, common.redis_timeout)
            try:
                with metrics.reporting(metrics.PoolStats(pool)):
                    yield Backends(pool, redis, StreamNames(common.redis_prefix), probe_connection)
            finally:
                await redis.aclose()
        finally:
            await probe_connection.close()
            await pool.close()
