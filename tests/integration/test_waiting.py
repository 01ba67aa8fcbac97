"""A task that has to wait gives its worker slot back (docs/scheduling.md, "Waiting gives the
slot back"): between fetch attempts and during an origin's Retry-After, the image waits in
Postgres, and the worker serves other requests meanwhile. Real Postgres, Redis, feeder and
worker, with one slot, and two origins on 127.0.0.1."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from services.common.db import queries
from services.common.fetch import FetchAllow, FetchLimits, make_session
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.streams import Delivery, TaskConsumer
from services.worker.processor import Processor
from services.worker.runner import ConsumePolicy, consume
from testing.origin import ImageOrigin, image_urls, serve_images
from testing.polling import wait_until_async
from testing.uploads import csv_of, upload
from tests.integration.flows import image_rows, wait_final

pytestmark = pytest.mark.integration

RETRY_AFTER = 3  # seconds the cooling origin asks for in its first answer


@pytest.fixture
async def cooling_origin() -> AsyncIterator[ImageOrigin]:
    """A second origin: the cooldown its 503 starts is its own, not the first origin's."""
    async with serve_images((320, 240)) as served:
        yield served


@pytest.fixture
async def http_session(
    origin: ImageOrigin, cooling_origin: ImageOrigin
) -> AsyncIterator[aiohttp.ClientSession]:
    """The processor's session (conftest), allowed to fetch from both origins."""
    allow = FetchAllow.parse(f"127.0.0.1:{origin.port},127.0.0.1:{cooling_origin.port}")
    session = make_session(allow, FetchLimits())
    try:
        yield session
    finally:
        await session.close()


@pytest.fixture
async def one_slot_worker(consumer: TaskConsumer, processor: Processor) -> AsyncIterator[None]:
    stop = asyncio.Event()
    worker = asyncio.create_task(consume(consumer, processor, ConsumePolicy(concurrency=1), stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(worker, timeout=15)


async def test_an_image_waiting_for_its_retry_leaves_the_only_slot_to_another_request(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    one_slot_worker: None,
    pool: asyncpg.Pool,
    origin: ImageOrigin,
    cooling_origin: ImageOrigin,
) -> None:
    first, second = cooling_origin.url("/img/first.jpg"), cooling_origin.url("/img/second.jpg")
    cooling_origin.unavailable["/img/first.jpg"] = [RETRY_AFTER]  # its first answer: 503
    slow = await upload(ingest_stub, csv_of([("1", "Boot", [first, second])]))
    prompt = await upload(ingest_stub, csv_of([("1", "Shoe", image_urls(origin, 3, "prompt"))]))

    prompt_row = await wait_final(pool, prompt.request_id)
    # The 503 asked for RETRY_AFTER seconds: in that time the one slot served the other
    # request whole, and the cooling origin saw nothing more.
    assert prompt_row["status"] == "Completed"
    assert [path for path, _ in cooling_origin.hits] == ["/img/first.jpg"]

    slow_row = await wait_final(pool, slow.request_id)
    assert slow_row["status"] == "Completed"
    first_times = [at for path, at in cooling_origin.hits if path == "/img/first.jpg"]
    assert len(first_times) == 2 and first_times[1] - first_times[0] >= RETRY_AFTER - 0.1
    assert cooling_origin.hits_of(second) == 1  # never sent while the origin cooled down
    rows = {r["input_url"]: r for r in await image_rows(pool, slow.request_id)}
    # The 503 spent an attempt; the wait for the cooldown spent none, and counted as a wait.
    assert (rows[first]["attempts"], rows[first]["cooldown_waits"]) == (2, 0)
    assert (rows[second]["attempts"], rows[second]["cooldown_waits"]) == (1, 1)
    assert all(r["error_code"] is None for r in rows.values())


async def test_an_origin_that_always_asks_to_wait_fails_its_image_after_the_attempts(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    one_slot_worker: None,
    pool: asyncpg.Pool,
    processor: Processor,
    cooling_origin: ImageOrigin,
) -> None:
    (url,) = image_urls(cooling_origin, 1, "busy")
    cooling_origin.unavailable[url.removeprefix(cooling_origin.url(""))] = [1] * 10
    accepted = await upload(ingest_stub, csv_of([("1", "Cap", [url])]))

    request = await wait_final(pool, accepted.request_id)

    assert request["status"] == "Failed"
    (row,) = await image_rows(pool, accepted.request_id)
    # Every attempt was a request (no more than the retry policy allows), each cooldown wait
    # was none, and the image ends with the origin's answer.
    attempts = processor.retry.max_attempts
    assert (row["attempts"], cooling_origin.hits_of(url)) == (attempts, attempts)
    assert row["cooldown_waits"] <= processor.retry.max_cooldown_waits
    assert (row["error_code"], row["status"]) == ("HTTP_STATUS", "Failed")
    assert "503" in row["error_message"]


async def test_a_stale_task_of_a_deferred_image_is_acknowledged_without_a_download(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    consumer: TaskConsumer,
    origin: ImageOrigin,
    processor: Processor,
) -> None:
    """A worker that dies between putting its image back and acknowledging the entry leaves
    the entry to be claimed: the task must not download an image deferred until later."""
    (url,) = image_urls(origin, 1, "stale")
    accepted = await upload(ingest_stub, csv_of([("1", "Hat", [url])]))
    await consumer.ensure_group()

    async def delivered() -> list[Delivery]:
        return await consumer.read(1, 100)

    (delivery,) = await wait_until_async(delivered, timeout=10, message="the task delivered")
    async with pool.acquire() as conn:
        image_id = await conn.fetchval(
            "SELECT id FROM images WHERE request_id = $1", uuid.UUID(accepted.request_id)
        )
        assert await queries.defer_image(conn, image_id, 3600)

    await processor.process(delivery.task, deliveries=2)

    assert origin.hits_of(url) == 0
    row = await pool.fetchrow("SELECT status, enqueued_at FROM images WHERE id = $1", image_id)
    assert row is not None and tuple(row) == ("Pending", None)
