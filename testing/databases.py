"""Throwaway databases and key prefixes: each test run (or module, or test) gets its own on a
shared Postgres or Redis server, and removes it afterwards (never FLUSHALL or a shared drop)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import asyncpg
import redis

from services.common.db.pool import create_pool, migrate


def with_database(dsn: str, database: str) -> str:
    """`dsn` with its database name replaced by `database`.

    Handles `postgresql://user:pw@host:port/db?x=y` and the socket form
    `postgresql://postgres@/postgres?host=/path`; a dbname/database query parameter is dropped.
    """
    parts = urlsplit(dsn)
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key in ("dbname", "database") for key, _ in pairs):
        kept = [(key, value) for key, value in pairs if key not in ("dbname", "database")]
        query = urlencode(kept, safe="/")
    # Composed by hand: urlunsplit() drops the "//" of an empty host for schemes it does not
    # know, and "postgresql:///db?host=/sock" must keep it.
    url = f"{parts.scheme}://{parts.netloc}/{quote(database)}"
    if query:
        url += f"?{query}"
    return url


async def create_database(server_url: str, name: str) -> str:
    """Create database `name` on the server at `server_url`; return a DSN for it.

    template0, not template1: the new database is empty whatever was added to template1, and
    copying template0 does not fail while someone else is connected to template1.
    """
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await connection.close()
    return with_database(server_url, name)


async def drop_database(server_url: str, name: str) -> None:
    """Drop database `name`, disconnecting whoever is still connected to it."""
    connection = await asyncpg.connect(server_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def own_database(server_url: str, prefix: str) -> AsyncIterator[asyncpg.Pool]:
    """A migrated database of the caller's own, for code that scans every row it finds
    (the reconciler, the webhook dispatcher); dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    url = await create_database(server_url, name)
    pool = await create_pool(url, max_size=6)
    try:
        await migrate(pool)
        yield pool
    finally:
        await pool.close()
        await drop_database(server_url, name)


def delete_keys(redis_url: str, pattern: str) -> int:
    """Delete the keys matching `pattern` with SCAN (never FLUSHALL); return how many."""
    deleted = 0
    client = redis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=500):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
    finally:
        client.close()
    return deleted


async def waits_for_a_lock(
    observer: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    *,
    pid: int | None = None,
    application_name: str | None = None,
) -> bool:
    """Whether a session of the observer's database waits for a lock: the one with `pid`, or
    those named `application_name`, or any. Read from pg_stat_activity, so a test can wait for
    a statement to queue behind the lock it holds instead of sleeping."""
    return bool(
        await observer.fetchval(
            """SELECT count(*) FROM pg_stat_activity
                WHERE datname = current_database() AND wait_event_type = 'Lock'
                  AND ($1::int IS NULL OR pid = $1)
                  AND ($2::text IS NULL OR application_name = $2)""",
            pid,
            application_name,
        )
    )
