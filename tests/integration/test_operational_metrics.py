"""The operators' metrics of issue 18, read from /metrics as Prometheus reads them: the Postgres
pool's connections in use and its waiting callers, the age of the oldest task a consumer group
has not acknowledged, and the time spent waiting for the worker's memory budgets."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import aiohttp
import pytest
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families

from services.common import metrics
from services.common.db.pool import create_pool
from services.common.metrics import PoolStats
from services.common.streams import StreamNames
from services.status.stream_metrics import StreamStats
from services.worker.budget import ByteBudget, PixelBudget
from testing.polling import wait_until, wait_until_async
from testing.ports import free_tcp_port

pytestmark = pytest.mark.integration


@pytest.fixture
def metrics_url() -> Iterator[str]:
    listen = f"127.0.0.1:{free_tcp_port()}"
    with metrics.serving(listen):
        yield f"http://{listen}/metrics"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_the_pool_reports_connections_in_use_and_callers_waiting(
    database_url: str, metrics_url: str
) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1, acquire_timeout=30)
    try:
        with metrics.reporting(PoolStats(pool)):
            held = await pool.acquire()
            waiter = asyncio.create_task(pool.execute("SELECT 1"))

            async def one_waiting() -> Samples | None:
                samples = await scrape(metrics_url)
                return samples if value(samples, "imgpipe_db_pool_waiting") == 1 else None

            samples = await wait_until_async(one_waiting, message="a caller waiting")
            assert value(samples, "imgpipe_db_pool_connections", state="in_use") == 1
            assert value(samples, "imgpipe_db_pool_connections", state="idle") == 0
            assert value(samples, "imgpipe_db_pool_max_connections") == 1

            await pool.release(held)
            assert await asyncio.wait_for(waiter, timeout=10) == "SELECT 1"
            samples = await scrape(metrics_url)
            assert value(samples, "imgpipe_db_pool_waiting") == 0
            assert value(samples, "imgpipe_db_pool_connections", state="in_use") == 0
            assert value(samples, "imgpipe_db_pool_connections", state="idle") == 1
        assert value(await scrape(metrics_url), "imgpipe_db_pool_waiting") is None
    finally:
        await pool.close()


async def test_the_oldest_unacknowledged_task_has_its_age_reported(
    redis_client: redis.asyncio.Redis, redis_prefix: str, metrics_url: str
) -> None:
    names = StreamNames(f"{redis_prefix}:oldest")
    group = "workers"
    seconds, _ = await redis_client.time()
    now_ms = int(seconds) * 1000
    # Entry ids are the times they were added: three tasks of 90, 60 and 30 seconds ago.
    ids = [f"{now_ms - age * 1000}-0" for age in (90, 60, 30)]
    for entry_id in ids:
        await redis_client.xadd(names.tasks, {b"task": b"x"}, id=entry_id)
    await redis_client.xgroup_create(names.tasks, group, id="0")
    stats = StreamStats(redis_client, [(names.tasks, group)], names.dead, interval=0.05)
    labels = {"stream": names.tasks, "group": group}

    async def age_of_oldest(expected: float) -> float:
        async def near() -> float | None:
            age = value(await scrape(metrics_url), "imgpipe_stream_oldest_age_seconds", **labels)
            return age if age is not None and expected <= age < expected + 15 else None

        return await wait_until_async(near, message=f"an age of about {expected} s")

    stop = asyncio.Event()
    loop = asyncio.create_task(stats.run(stop))
    try:
        await age_of_oldest(90)  # none delivered: the first waiting one
        await redis_client.xreadgroup(group, "c1", {names.tasks: ">"}, count=2)
        await age_of_oldest(90)  # delivered, not acknowledged: still queued
        await redis_client.xack(names.tasks, group, ids[0])
        await age_of_oldest(60)  # the oldest pending one
        await redis_client.xack(names.tasks, group, ids[1])
        await age_of_oldest(30)  # the first not yet delivered
        await redis_client.xreadgroup(group, "c1", {names.tasks: ">"}, count=1)
        await redis_client.xack(names.tasks, group, ids[2])

        async def drained() -> bool:
            age = value(await scrape(metrics_url), "imgpipe_stream_oldest_age_seconds", **labels)
            return age == 0

        await wait_until_async(drained, message="no task left")
    finally:
        stop.set()
        await asyncio.wait_for(loop, timeout=10)
        await redis_client.delete(names.tasks, names.dead)


async def test_time_waiting_for_the_byte_and_pixel_budgets_is_observed(metrics_url: str) -> None:
    before = await scrape(metrics_url)

    def count(samples: Samples, budget: str) -> float:
        return value(samples, "imgpipe_budget_wait_seconds_count", budget=budget) or 0.0

    def total(samples: Samples, budget: str) -> float:
        return value(samples, "imgpipe_budget_wait_seconds_sum", budget=budget) or 0.0

    # Bytes: the second download waits until the first gives its bytes back.
    budget = ByteBudget(10, metrics.budget_waited("bytes"))
    await budget.acquire(10)
    waiter = asyncio.create_task(budget.acquire(5))

    async def queued() -> bool:
        return budget.waiting == 1

    await wait_until_async(queued, message="a queued download")
    budget.release(10)
    await asyncio.wait_for(waiter, timeout=5)

    # Pixels: a compress thread waits until the other's image is done.
    pixels = PixelBudget(100, metrics.budget_waited("pixels"))
    release = threading.Event()

    def image(amount: int) -> None:
        with pixels.reserve(amount):
            release.wait(10)

    first = threading.Thread(target=image, args=(100,))
    first.start()
    wait_until(lambda: pixels.used == 100, message="the first image held")
    second = threading.Thread(target=image, args=(50,))
    second.start()
    wait_until(lambda: pixels.waiting == 1, message="the second image waiting")
    release.set()
    first.join(10)
    second.join(10)

    after = await scrape(metrics_url)
    assert count(after, "bytes") - count(before, "bytes") == 2  # one at once, one after waiting
    assert count(after, "pixels") - count(before, "pixels") == 2
    assert total(after, "bytes") > total(before, "bytes")
    assert total(after, "pixels") > total(before, "pixels")
