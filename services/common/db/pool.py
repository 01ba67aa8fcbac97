"""The asyncpg pool and the migration runner."""

from __future__ import annotations

import contextlib
import logging
import math
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
from asyncpg.pool import PoolAcquireContext

from services.common.errors import BackendBusy

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# pg_advisory_lock key: the bytes of "imgpipe" as an integer, so it is recognisable in pg_locks.
MIGRATION_LOCK_KEY = int.from_bytes(b"imgpipe", "big")

Pool = asyncpg.Pool
# A connection, or the pool's proxy of one: what the query functions take.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
DEFAULT_ACQUIRE_TIMEOUT = 5.0
# The longest a statement may go unanswered before it fails as a
# backend error: IMGPIPE_DB_COMMAND_TIMEOUT, chosen from the longest legitimate statements
# (docs/operations.md, "Postgres timeouts").
DEFAULT_COMMAND_TIMEOUT = 60.0
# Migrations are exempt: a replica waits for another to finish migrating, and a migration of
# a big table may take long. An hour still ends a wait on a Postgres that stopped answering.
MIGRATION_TIMEOUT = 3600.0


class PooledConnection(asyncpg.Connection):
    """A connection that goes back to the pool without asyncpg's reset query.

    asyncpg sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on every
    release: four statements, about 40 % of a worker's round trips to Postgres (an image takes
    two or three acquires). imgpipe keeps no session state on a pooled connection: no LISTEN,
    no SET, no cursor outside a transaction, and the session advisory locks are released by
    the helper that took them, which terminates the connection when the unlock fails
    (`advisory_lock`). asyncpg still rolls back an open transaction on release.
    """

    def get_reset_query(self) -> str:
        return ""


# Postgres has two key spaces for advisory locks that never meet: one 64-bit key, or two 32-bit
# keys. The services' own locks (migrations, feeder, reconciler, janitor, a request's output
# CSV) take one key, built from constants and ids the service made. A lock whose key a caller
# chooses (an upload's Idempotency-Key) takes two, so no caller can pick the key of a service's
# lock: Postgres's hash is easily run backwards, and a key once hashed onto the feeder's stopped
# every tenant's releases for as long as its upload held it.
AdvisoryKey = int | tuple[int, int]


@contextlib.asynccontextmanager
async def advisory_lock(
    conn: Connection, key: AdvisoryKey, *, wait: bool = True, wait_seconds: float | None = None
) -> AsyncIterator[bool]:
    """Hold the session advisory lock `key` (one 64-bit key, or a pair of 32-bit ones) on
    `conn` for the block; yields whether it was taken (always, when `wait`, within
    `wait_seconds` or else the command timeout; with `wait=False` only when no other session
    holds it).

    Taking or releasing it is never left half done: if either fails or is cancelled, the
    connection is terminated, so the lock ends with its session and never goes back to the
    pool held (PooledConnection's release does not unlock everything).
    """
    keys = key if isinstance(key, tuple) else (key,)
    slots = ", ".join(f"${n}" for n in range(1, len(keys) + 1))
    try:
        if wait:
            await conn.execute(f"SELECT pg_advisory_lock({slots})", *keys, timeout=wait_seconds)
            taken = True
        else:
            taken = bool(await conn.fetchval(f"SELECT pg_try_advisory_lock({slots})", *keys))
    except BaseException:
        conn.terminate()
        raise
    try:
        yield taken
    finally:
        if taken:
            try:
                await conn.execute(f"SELECT pg_advisory_unlock({slots})", *keys)
            except BaseException:
                conn.terminate()
                raise


class BoundedWaitPool(asyncpg.Pool):
    """A pool whose `acquire()` waits at most `acquire_timeout` seconds by default, then raises
    BackendBusy: a call that finds every connection in use is answered UNAVAILABLE with
    Retry-After instead of queueing behind them for as long as they last."""

    def __init__(self, *args: Any, acquire_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquire_timeout = acquire_timeout
        self.waiting = 0  # callers in acquire() right now (imgpipe_db_pool_waiting)

    def acquire(self, *, timeout: float | None = None) -> Any:
        return _BusyIsUnavailable(
            super().acquire(timeout=self.acquire_timeout if timeout is None else timeout),
            self.acquire_timeout if timeout is None else timeout,
            self,
        )


class _BusyIsUnavailable:
    """`PoolAcquireContext`, awaited or entered, with its timeout raised as BackendBusy, and
    counted in the pool's `waiting` while it waits."""

    def __init__(self, inner: PoolAcquireContext, timeout: float, pool: BoundedWaitPool) -> None:
        self._inner = inner
        self._timeout = timeout
        self._pool = pool

    async def __aenter__(self) -> Any:
        self._pool.waiting += 1
        try:
            return await self._inner.__aenter__()
        except TimeoutError:
            raise self._busy() from None
        finally:
            self._pool.waiting -= 1

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._inner.__aexit__(kind, exc, tb)

    def __await__(self) -> Any:
        return self._acquired().__await__()

    async def _acquired(self) -> Any:
        self._pool.waiting += 1
        try:
            return await self._inner
        except TimeoutError:
            raise self._busy() from None
        finally:
            self._pool.waiting -= 1

    def _busy(self) -> BackendBusy:
        return BackendBusy(
            "every database connection stayed in use for "
            f"IMGPIPE_DB_ACQUIRE_TIMEOUT={self._timeout:g}s; retry later",
            retry_after=max(1, math.ceil(self._timeout)),
        )


def server_settings(dsn: str, application_name: str | None) -> dict[str, str] | None:
    """Postgres settings for a connection of ours: `application_name` (what pg_stat_activity
    shows, so an operator can see which service holds which connections), unless the DSN
    names one itself."""
    if application_name is None or "application_name=" in urllib.parse.urlsplit(dsn).query:
        return None
    return {"application_name": application_name}


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    application_name: str | None = None,
) -> asyncpg.Pool:
    """A pool whose statements fail with TimeoutError (a backend error) after
    `command_timeout` seconds unanswered, instead of waiting for as long as TCP takes to give
    up on a Postgres that stopped answering; asyncpg then cancels the statement on the server,
    or closes the connection if it cannot. Opening a connection is bounded by the acquire
    timeout, which the connection is opened for."""
    pool = BoundedWaitPool(
        dsn,
        server_settings=server_settings(dsn, application_name),
        command_timeout=command_timeout,
        min_size=min_size,
        max_size=max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        connect=None,
        setup=None,
        init=None,
        reset=None,
        loop=None,
        connection_class=PooledConnection,
        record_class=asyncpg.Record,
        acquire_timeout=acquire_timeout,
    )
    await pool
    return pool


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Apply pending migrations in order, under an advisory lock so replicas can start together.

    Returns the names of the migrations this call applied.
    """
    applied: list[str] = []
    async with (
        pool.acquire() as conn,
        advisory_lock(conn, MIGRATION_LOCK_KEY, wait_seconds=MIGRATION_TIMEOUT),
    ):
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
            version = int(path.name.split("_", 1)[0])
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text(), timeout=MIGRATION_TIMEOUT)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    version,
                    path.stem,
                )
            log.info("applied migration", extra={"migration": path.stem})
            applied.append(path.stem)
    return applied
