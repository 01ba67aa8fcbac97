"""A task that has to wait gives its worker slot back (docs/scheduling.md, "Waiting gives the
slot back"): between fetch attempts, during an origin's Retry-After and while every
connection to its origin stays busy, the image waits in Postgres, and the worker serves other
requests meanwhile. Real Postgres, Redis, feeder and worker, with few slots, and origins on
127.0.0.1."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import asyncpg
import pytest
import redis.asyncio

from services.common.db import queries
from services.common.fetch import (
    FetchAllow,
    FetchLimits,
    KeepWaiting,
    OriginKey,
    Reserve,
    fetch_image,
    make_session,
)
from services.common.image_options import ImageLimits
from services.common.outcome import RetryPolicy
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import task_pb2
from services.common.storage import Storage
from services.common.streams import (
    Delivery,
    StreamNames,
    TaskConsumer,
    publish_tasks,
    slot_demand,
)
from services.worker.processor import DEFAULT_WAITING_READ, Processor
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


# --- waiting for a connection ---------------------------------------------------------------

CONNECTION_WAIT = 0.1  # seconds a task of the narrow worker waits for its origin's connection

StartWorker = Callable[..., Awaitable[Processor]]


@pytest.fixture
async def busy_origin() -> AsyncIterator[ImageOrigin]:
    """An origin whose images are answered once the test opens their gates."""
    async with serve_images((320, 240)) as served:
        yield served


@pytest.fixture
def kept() -> list[tuple[str, bool]]:
    """What the narrow worker's tasks decided each time a wait for a connection ran out: the
    URL, and whether the task kept waiting in its slot."""
    return []


@pytest.fixture
async def narrow_worker(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    storage: Storage,
    executor: ThreadPoolExecutor,
    consumer: TaskConsumer,
    origin: ImageOrigin,
    busy_origin: ImageOrigin,
    kept: list[tuple[str, bool]],
) -> AsyncIterator[StartWorker]:
    """Starts a worker of two slots and one connection per origin, whose tasks may give their
    slot back after each CONNECTION_WAIT, at most `busy_waits` times per image (reading
    `waiting_read` tasks waiting for a slot to decide); each decision is noted in `kept`."""
    allow = FetchAllow.parse(f"127.0.0.1:{origin.port},127.0.0.1:{busy_origin.port}")
    session = make_session(allow, FetchLimits(), limit_per_host=1)
    stop = asyncio.Event()
    running: list[asyncio.Task[None]] = []

    async def fetch(
        url: str,
        *,
        reserve: Reserve | None = None,
        connection_wait: float | None = None,
        keep_waiting: KeepWaiting | None = None,
    ) -> bytes:
        async def noted(origin: OriginKey) -> bool:
            assert keep_waiting is not None
            answer = await keep_waiting(origin)
            kept.append((url, answer))
            return answer

        return await fetch_image(
            session,
            url,
            FetchLimits(),
            reserve=reserve,
            connection_wait=connection_wait,
            keep_waiting=noted,
        )

    async def start(busy_waits: int, waiting_read: int = DEFAULT_WAITING_READ) -> Processor:
        processor = Processor(
            pool=pool,
            redis=redis_client,
            names=names,
            storage=storage,
            fetch=fetch,
            executor=executor,
            image_limits=ImageLimits(),
            retry=RetryPolicy(max_busy_waits=busy_waits),
            connection_wait=CONNECTION_WAIT,
            waiting_read=waiting_read,
        )
        policy = ConsumePolicy(concurrency=2)
        running.append(asyncio.create_task(consume(consumer, processor, policy, stop)))
        return processor

    try:
        yield start
    finally:
        for gate in busy_origin.gates.values():
            gate.set()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), timeout=15)
        await session.close()


def gated(origin: ImageOrigin, count: int, tag: str) -> list[str]:
    """`count` image URLs of the origin, each answered once the test sets its gate."""
    urls = image_urls(origin, count, tag)
    for url in urls:
        origin.gates[url.removeprefix(origin.url(""))] = asyncio.Event()
    return urls


def open_gates(origin: ImageOrigin) -> None:
    for gate in origin.gates.values():
        gate.set()


async def test_a_task_waiting_for_a_busy_origins_connection_leaves_its_slot_to_another_request(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    narrow_worker: StartWorker,
    pool: asyncpg.Pool,
    origin: ImageOrigin,
    busy_origin: ImageOrigin,
) -> None:
    await narrow_worker(1000)  # bounds that this test never reaches
    held = gated(busy_origin, 3, "held")
    slow = await upload(ingest_stub, csv_of([("1", "Boot", held)]))
    prompt = await upload(ingest_stub, csv_of([("1", "Shoe", image_urls(origin, 4, "prompt"))]))

    # One slow image holds the origin's only connection and the worker's first slot; the
    # other two took turns in the second slot with the prompt request, each waiting no more
    # than CONNECTION_WAIT before giving the slot back.
    assert (await wait_final(pool, prompt.request_id))["status"] == "Completed"
    assert len(busy_origin.hits) == 1  # nothing else was sent while the connection was busy
    rows = await image_rows(pool, slow.request_id)
    assert sorted(r["busy_waits"] > 0 for r in rows) == [False, True, True]

    open_gates(busy_origin)
    assert (await wait_final(pool, slow.request_id))["status"] == "Completed"
    rows = await image_rows(pool, slow.request_id)
    # Waiting for a connection is no attempt, and no error.
    assert [(r["attempts"], r["error_code"]) for r in rows] == [(1, None)] * 3
    assert sorted(busy_origin.hits_of(url) for url in held) == [1, 1, 1]


async def test_an_image_gives_its_slot_back_as_often_as_allowed_then_waits_in_it(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    narrow_worker: StartWorker,
    pool: asyncpg.Pool,
    busy_origin: ImageOrigin,
) -> None:
    # Reading one waiting task, the worker cannot tell whether more wait behind it, of other
    # origins: a full read counts as a task that could use the slot.
    processor = await narrow_worker(2, waiting_read=1)
    # Six images for two slots: while one holds the connection, other tasks wait for a slot
    # (at most two are put back at a time), so the one waiting for the connection gives its
    # slot back.
    held = gated(busy_origin, 6, "bounded")
    accepted = await upload(ingest_stub, csv_of([("1", "Boot", held)]))

    async def waiting_in_its_slot() -> bool:
        # Put back as often as allowed, then released again: its task waits in its slot.
        rows = await image_rows(pool, accepted.request_id)
        return any(
            r["busy_waits"] == processor.retry.max_busy_waits and r["enqueued_at"] is not None
            for r in rows
        )

    await wait_until_async(waiting_in_its_slot, timeout=10, message="a task waiting in its slot")
    open_gates(busy_origin)

    assert (await wait_final(pool, accepted.request_id))["status"] == "Completed"
    rows = await image_rows(pool, accepted.request_id)
    # Never more waits than the bound, each image sent once.
    assert max(r["busy_waits"] for r in rows) == processor.retry.max_busy_waits
    assert [busy_origin.hits_of(url) for url in held] == [1] * 6


@pytest.mark.parametrize(
    "images",
    [
        pytest.param(2, id="the last images of a request: nobody waits behind"),
        pytest.param(6, id="a catalog from one origin: only tasks of the busy origin wait"),
    ],
)
async def test_a_task_whose_slot_would_serve_nobody_waits_on_in_it_for_the_connection(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    narrow_worker: StartWorker,
    pool: asyncpg.Pool,
    busy_origin: ImageOrigin,
    kept: list[tuple[str, bool]],
    images: int,
) -> None:
    """Giving the slot back serves a task waiting for one only if it would download from
    another origin: those of the busy origin would queue for the same connection. Given back,
    the image would be away when the connection frees."""
    await narrow_worker(1000)
    held = gated(busy_origin, images, "waits-on")
    accepted = await upload(ingest_stub, csv_of([("1", "Boot", held)]))

    async def waited_on() -> bool:
        return any(keep for _, keep in kept)

    await wait_until_async(waited_on, timeout=10, message="a task keeping its place")
    rows = await image_rows(pool, accepted.request_id)
    assert all(r["enqueued_at"] is not None for r in rows)  # none was put back
    open_gates(busy_origin)

    assert (await wait_final(pool, accepted.request_id))["status"] == "Completed"
    rows = await image_rows(pool, accepted.request_id)
    assert [r["busy_waits"] for r in rows] == [0] * images
    assert [busy_origin.hits_of(url) for url in held] == [1] * images
    assert all(keep for _, keep in kept)


async def test_a_task_keeping_its_place_gives_its_slot_to_a_newcomer_of_another_origin(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    narrow_worker: StartWorker,
    pool: asyncpg.Pool,
    origin: ImageOrigin,
    busy_origin: ImageOrigin,
    kept: list[tuple[str, bool]],
) -> None:
    """A request that arrives after the busy origin's tasks settled to wait in their slots
    still gets a slot: each round of the wait asks again."""
    await narrow_worker(1000)
    held = gated(busy_origin, 2, "settled")
    slow = await upload(ingest_stub, csv_of([("1", "Boot", held)]))

    async def settled() -> bool:
        return any(keep for _, keep in kept)

    await wait_until_async(settled, timeout=10, message="a task keeping its place")
    prompt = await upload(ingest_stub, csv_of([("1", "Shoe", image_urls(origin, 3, "late"))]))

    assert (await wait_final(pool, prompt.request_id))["status"] == "Completed"
    given_back = [url for url, keep in kept if not keep]
    assert given_back and set(given_back) <= set(held)
    open_gates(busy_origin)
    assert (await wait_final(pool, slow.request_id))["status"] == "Completed"
    rows = await image_rows(pool, slow.request_id)
    assert sorted(r["busy_waits"] for r in rows) == [0, len(given_back)]


async def test_the_demand_for_a_slot_is_the_undelivered_entries_and_the_feeders_word(
    redis_client: redis.asyncio.Redis, names: StreamNames, consumer: TaskConsumer
) -> None:
    async def waiting(count: int = 10) -> list[task_pb2.ImageTask]:
        return (await slot_demand(redis_client, names, count)).waiting

    assert await waiting() == []  # no stream yet
    await consumer.ensure_group()
    assert await waiting() == []  # nothing on it
    tasks = [
        task_pb2.ImageTask(image_id=i, request_id=str(uuid.uuid4()), input_url=f"http://h{i}/")
        for i in (1, 2, 3)
    ]
    await publish_tasks(redis_client, names, tasks)
    assert await waiting() == tasks
    assert await waiting(2) == tasks[:2]  # at most the count

    assert len(await consumer.read(1, 100)) == 1
    assert await waiting() == tasks[1:]
    assert len(await consumer.read(2, 100)) == 2
    assert await waiting() == []  # taken, though not acknowledged

    assert not (await slot_demand(redis_client, names, 10)).starved
    await redis_client.set(names.starved, b"1")  # as the feeder says it
    assert (await slot_demand(redis_client, names, 10)).starved
