"""Migrations: applied once, in order, even when several replicas start together."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.common.db.pool import MIGRATIONS_DIR, create_pool, migrate
from testing.databases import create_database, drop_database

pytestmark = pytest.mark.integration


@pytest.fixture
async def fresh_database(postgres_server_url: str) -> AsyncIterator[str]:
    name = f"imgpipe_migrate_{secrets.token_hex(4)}"
    url = await create_database(postgres_server_url, name)
    try:
        yield url
    finally:
        await drop_database(postgres_server_url, name)


async def test_replicas_starting_together_apply_each_migration_once(fresh_database: str) -> None:
    pools = [await create_pool(fresh_database, max_size=2) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(pool) for pool in pools))
        expected = sorted(path.stem for path in MIGRATIONS_DIR.glob("*.sql"))
        applied = [name for result in results for name in result]
        assert sorted(applied) == expected  # every migration by exactly one replica
        assert await migrate(pools[0]) == []  # and nothing again on a restart
        rows = await pools[0].fetch("SELECT name FROM schema_migrations ORDER BY version")
        assert [r["name"] for r in rows] == expected
        tables = {
            r["tablename"]
            for r in await pools[0].fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        assert {"requests", "products", "images", "webhook_deliveries"} <= tables
    finally:
        await asyncio.gather(*(pool.close() for pool in pools))


async def test_counters_cannot_exceed_the_total(fresh_database: str) -> None:
    pool = await create_pool(fresh_database, max_size=1)
    try:
        await migrate(pool)
        with pytest.raises(asyncpg.CheckViolationError):
            await pool.execute(
                """INSERT INTO requests (id, images_total, images_done)
                   VALUES (gen_random_uuid(), 1, 2)"""
            )
    finally:
        await pool.close()
