"""The queue gauges, read from a real Redis: lag, pending and dead letters."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio
from prometheus_client import REGISTRY

from services.common.csv_format import ProductRow
from services.common.db import queries
from services.common.streams import StreamNames
from services.status.stream_metrics import StreamStats, entries_after, group_state
from testing.databases import own_database
from testing.polling import wait_until_async

pytestmark = pytest.mark.integration


async def test_lag_pending_and_dead_letters_follow_the_streams(
    redis_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    names = StreamNames(f"{redis_prefix}:metrics")  # streams no other test reads
    group = "workers"
    assert await group_state(redis_client, names.tasks, group) == (0, 0)  # no stream yet
    ids = [_text(await redis_client.xadd(names.tasks, {b"task": b"x"})) for _ in range(5)]
    assert await group_state(redis_client, names.tasks, group) == (5, 0)  # no group yet

    await redis_client.xgroup_create(names.tasks, group, id="0")
    await redis_client.xreadgroup(group, "c1", {names.tasks: ">"}, count=2)
    assert await group_state(redis_client, names.tasks, group) == (3, 2)
    await redis_client.xack(names.tasks, group, ids[0])
    assert await group_state(redis_client, names.tasks, group) == (3, 1)
    # What Redis 6 is asked instead of the lag field it lacks.
    assert await entries_after(redis_client, names.tasks, ids[1]) == 3
    assert await entries_after(redis_client, names.tasks, "0-0") == 5

    await redis_client.xadd(names.dead, {b"task": b"x"})
    stats = StreamStats(
        redis_client, [(names.tasks, group), (names.events, "webhooks")], names.dead
    )
    stop = asyncio.Event()
    loop = asyncio.create_task(stats.run(stop))
    try:

        async def reported() -> float | None:
            return REGISTRY.get_sample_value(
                "imgpipe_stream_lag", {"stream": names.tasks, "group": group}
            )

        assert await wait_until_async(reported, timeout=10, message="the first reading") == 3
        labels = {"stream": names.tasks, "group": group}
        assert REGISTRY.get_sample_value("imgpipe_stream_pending", labels) == 1
        events = {"stream": names.events, "group": "webhooks"}
        assert REGISTRY.get_sample_value("imgpipe_stream_lag", events) == 0
        assert REGISTRY.get_sample_value("imgpipe_dead_letter_entries") == 1
    finally:
        stop.set()
        await asyncio.wait_for(loop, timeout=10)
    # Unregistered with its loop: a stopped service reports nothing stale.
    assert REGISTRY.get_sample_value("imgpipe_dead_letter_entries") is None
    await redis_client.delete(names.tasks, names.events, names.dead)


async def test_the_backlog_gauge_counts_images_not_final_in_postgres(
    redis_client: redis.asyncio.Redis, redis_prefix: str, postgres_server_url: str
) -> None:
    names = StreamNames(f"{redis_prefix}:backlog")
    async with own_database(postgres_server_url, "imgpipe_backlog") as pool:
        request_id = uuid.uuid4()
        urls = tuple(f"http://a.example/{i}.jpg" for i in range(3))
        async with pool.acquire() as conn:
            await queries.insert_request(
                conn, request_id, options={}, webhook_url=None, owner="", idempotency_key=None
            )
            await queries.insert_products(conn, request_id, [ProductRow(2, "1", "Shoe", urls)])
            await queries.complete_request_insert(
                conn, request_id, products_total=1, images_total=3, content_hash=b""
            )

        async def backlog() -> int:
            async with pool.acquire() as conn:
                return await queries.backlog(conn)

        stats = StreamStats(redis_client, [], names.dead, backlog=backlog)
        stop = asyncio.Event()
        loop = asyncio.create_task(stats.run(stop))
        try:

            async def reported() -> float | None:
                return REGISTRY.get_sample_value("imgpipe_backlog_images")

            # Nothing was released to any stream: the backlog is Postgres's count, not Redis's.
            assert await wait_until_async(reported, timeout=10, message="the backlog") == 3
        finally:
            stop.set()
            await asyncio.wait_for(loop, timeout=10)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
