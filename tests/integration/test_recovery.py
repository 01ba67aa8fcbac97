"""Taking over from dead consumers, dead letters, the reconciler, retries and safe trimming,
against real Postgres and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio
from prometheus_client import REGISTRY

from services.common.db import queries
from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import request_pb2, task_pb2
from services.common.proto_convert import finished_event
from services.common.streams import (
    EVENT_FIELD,
    TASK_FIELD,
    WORKER_GROUP,
    StreamNames,
    TaskConsumer,
    publish_event_once,
    trim_acknowledged,
)
from services.ingest.feeder import LEADER_LOCK_KEY as FEEDER_LOCK_KEY
from services.worker.processor import Processor
from services.worker.reconciler import Reconciler
from services.worker.runner import ConsumePolicy, consume
from testing.databases import own_database
from testing.origin import ImageOrigin
from testing.polling import wait_until_async
from testing.uploads import csv_of, upload
from tests.integration.flows import image_rows, released_rows, stream_messages

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(postgres_server_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A database of this test's own: the reconciler scans every request in its database."""
    async with own_database(postgres_server_url, "imgpipe_recovery") as pool:
        yield pool


@pytest.fixture
def reconciler(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, processor: Processor
) -> Reconciler:
    return Reconciler(pool=pool, redis=redis_client, names=names, processor=processor, min_age=0)


@pytest.fixture
async def worker(consumer: TaskConsumer, processor: Processor) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(consume(consumer, processor, ConsumePolicy(concurrency=4), stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


@contextlib.asynccontextmanager
async def another_feeder_leads(pool: asyncpg.Pool) -> AsyncIterator[queries.Connection]:
    """Another feeder leads (and is stuck, or dead with its session still open): the test's
    own ingest releases nothing. Taken between two of its passes: it holds the lock only
    during one."""
    async with pool.acquire() as leader:
        await leader.execute("SELECT pg_advisory_lock($1)", FEEDER_LOCK_KEY)
        try:
            yield leader
        finally:
            await leader.execute("SELECT pg_advisory_unlock($1)", FEEDER_LOCK_KEY)


async def request_row(pool: asyncpg.Pool, request_id: str) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM requests WHERE id = $1", uuid.UUID(request_id))
    assert row is not None
    return row


async def wait_status(pool: asyncpg.Pool, request_id: str, *statuses: str) -> asyncpg.Record:
    async def reached() -> asyncpg.Record | None:
        row = await request_row(pool, request_id)
        return row if row["status"] in statuses else None

    return await wait_until_async(reached, timeout=30, message=f"status in {statuses}")


async def finished_events(
    client: redis.asyncio.Redis, names: StreamNames, request_id: str
) -> list[request_pb2.RequestEvent]:
    events = await stream_messages(client, names.events, EVENT_FIELD, request_pb2.RequestEvent)
    return [e for e in events if e.request_id == request_id]


async def test_entries_of_a_dead_consumer_are_claimed_with_their_delivery_count(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
) -> None:
    accepted = await upload(
        ingest_stub, csv_of([("1", "Shoe", ["http://a.example/1.jpg", "http://a.example/2.jpg"])])
    )
    await released_rows(pool, accepted.request_id)
    dead = TaskConsumer(redis_client, names, "dead-worker")
    await dead.ensure_group()
    taken = await dead.read(10, 100)  # delivered; then the worker is killed
    assert len(taken) == 2

    survivor = TaskConsumer(redis_client, names, "survivor")
    assert await survivor.claim_stale(min_idle_ms=60_000, count=10) == []  # not idle long enough
    claimed = await survivor.claim_stale(min_idle_ms=0, count=10)

    assert sorted(d.entry_id for d in claimed) == sorted(d.entry_id for d in taken)
    assert {d.deliveries for d in claimed} == {2}
    pending = await redis_client.xpending_range(names.tasks, WORKER_GROUP, "-", "+", 10)
    assert {p["consumer"] for p in pending} == {b"survivor"}


async def test_a_task_delivered_too_often_is_dead_lettered_with_its_last_error(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    processor: Processor,
    origin: ImageOrigin,
) -> None:
    accepted = await upload(
        ingest_stub, csv_of([("1", "Shoe", ["http://a.example/x.jpg", origin.url("/img/ok.jpg")])])
    )
    rows = await image_rows(pool, accepted.request_id)
    poisoned = rows[0]["id"]
    await pool.execute(
        "UPDATE images SET error_code = 'TIMEOUT', error_message = 'slow' WHERE id = $1", poisoned
    )
    # Five consumers took the first task in turn and died with it.
    for n in range(5):
        consumer = TaskConsumer(redis_client, names, f"dying-{n}")
        await consumer.ensure_group()
        if n == 0:
            assert len(await consumer.read(1, 100)) == 1
        else:
            assert len(await consumer.claim_stale(0, 10)) == 1
    policy = ConsumePolicy(
        concurrency=4, visibility_timeout=0, claim_interval=0.05, max_deliveries=4
    )
    stop = asyncio.Event()
    last = TaskConsumer(redis_client, names, "last")
    reclaimed_before = _reclaimed()
    task = asyncio.create_task(consume(last, processor, policy, stop))
    try:
        request = await wait_status(pool, accepted.request_id, "Completed", "Failed")
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    assert request["status"] == "Completed"
    assert _reclaimed() - reclaimed_before >= 1  # the poisoned task, taken over from dying-4
    rows = await image_rows(pool, accepted.request_id)
    assert [r["status"] for r in rows] == ["Failed", "Done"]
    assert rows[0]["error_code"] == "TIMEOUT"
    assert "gave up after 6 deliveries" in rows[0]["error_message"]
    dead: Any = await redis_client.xrange(names.dead)
    assert len(dead) == 1
    assert dead[0][1][b"error_code"] == b"TIMEOUT"
    assert (await redis_client.xpending(names.tasks, WORKER_GROUP))["pending"] == 0


def _reclaimed() -> float:
    return REGISTRY.get_sample_value("imgpipe_tasks_reclaimed_total") or 0.0


async def test_reconciler_republishes_only_lost_tasks(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    reconciler: Reconciler,
) -> None:
    urls = [f"http://a.example/{i}.jpg" for i in range(4)]
    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", urls)]))
    rows = await released_rows(pool, accepted.request_id)
    consumer = TaskConsumer(redis_client, names, "busy")
    await consumer.ensure_group()
    in_flight = await consumer.read(1, 100)  # one delivered and pending: live
    # One entry deleted from the stream (what a Redis data loss does): lost.
    lost_id = rows[3]["stream_entry_id"]
    await redis_client.xdel(names.tasks, lost_id)

    result = await reconciler.reconcile_once()

    assert result.leader
    assert result.republished == 1
    after = await image_rows(pool, accepted.request_id)
    assert after[3]["stream_entry_id"] != lost_id
    assert [r["stream_entry_id"] for r in after[:3]] == [r["stream_entry_id"] for r in rows[:3]]
    assert in_flight[0].entry_id == rows[0]["stream_entry_id"]
    # Nothing is lost now: a second pass republishes nothing.
    assert (await reconciler.reconcile_once()).republished == 0


async def test_reconciler_recovers_everything_after_the_stream_is_gone(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    reconciler: Reconciler,
    consumer: TaskConsumer,
    processor: Processor,
    origin: ImageOrigin,
) -> None:
    # Published, then Redis lost everything (group included) before any worker read it.
    urls = [origin.url(f"/img/gone{i}.jpg") for i in range(3)]
    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", urls)]))
    await released_rows(pool, accepted.request_id)
    await redis_client.delete(names.tasks)

    assert (await reconciler.reconcile_once()).republished == 3

    stop = asyncio.Event()
    worker = asyncio.create_task(consume(consumer, processor, ConsumePolicy(concurrency=4), stop))
    try:
        request = await wait_status(pool, accepted.request_id, "Completed")
    finally:
        stop.set()
        await asyncio.wait_for(worker, timeout=10)
    assert request["images_done"] == 3


async def test_reconciler_finishes_and_publishes_what_a_crash_left_undone(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    reconciler: Reconciler,
) -> None:
    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", ["http://a.example/1.jpg"])]))
    request_id = uuid.UUID(accepted.request_id)
    [row] = await released_rows(pool, accepted.request_id)
    # A worker recorded the last image, then died before finishing the request.
    async with pool.acquire() as conn:
        await queries.record_image_failed(conn, row["id"], code="HTTP_STATUS", message="404")

    first = await reconciler.reconcile_once()
    assert first.finished == 1
    request = await request_row(pool, accepted.request_id)
    assert request["status"] == "Failed"
    assert request["finished_event_at"] is not None
    [event] = await finished_events(redis_client, names, accepted.request_id)
    assert event.event_id == f"evt_{request_id.hex}_0"

    # A crash after the XADD but before noting it: the reconciler publishes again, and the
    # event-id guard keeps it a single event.
    await pool.execute("UPDATE requests SET finished_event_at = NULL WHERE id = $1", request_id)
    again = await reconciler.reconcile_once()
    assert again.events == 1
    assert len(await finished_events(redis_client, names, accepted.request_id)) == 1


async def test_publish_once_is_atomic_under_concurrency(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames
) -> None:
    row = await pool.fetchrow(
        "INSERT INTO requests (id, status, images_total) VALUES ($1, 'Completed', 0) RETURNING *",
        uuid.uuid4(),
    )
    assert row is not None
    async with pool.acquire() as conn:
        request = await queries.get_request(conn, row["id"])
    assert request is not None
    event = finished_event(request)
    results = await asyncio.gather(
        *(publish_event_once(redis_client, names, event) for _ in range(10))
    )
    assert results.count(True) == 1
    assert len(await finished_events(redis_client, names, str(row["id"]))) == 1


async def test_retry_failed_images_reopens_and_finishes_again(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    origin: ImageOrigin,
    worker: asyncio.Event,
) -> None:
    origin.missing.add("/img/late.jpg")
    urls = [origin.url("/img/early.jpg"), origin.url("/img/late.jpg")]
    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", urls)]))
    first = await wait_status(pool, accepted.request_id, "Completed")
    assert (first["images_done"], first["images_failed"]) == (1, 1)

    origin.missing.clear()
    response = await ingest_stub.RetryFailedImages(
        ingest_pb.RetryFailedImagesRequest(request_id=accepted.request_id), timeout=5
    )
    assert response.images_retried == 1
    assert response.status == request_pb2.REQUEST_STATUS_PROCESSING

    async def done_again() -> asyncpg.Record | None:
        row = await request_row(pool, accepted.request_id)
        return row if row["status"] == "Completed" and row["images_done"] == 2 else None

    second = await wait_until_async(done_again, timeout=30, message="finished again")
    assert (second["images_failed"], second["finish_generation"]) == (0, 1)
    events = await wait_until_async(
        lambda: _two_events(redis_client, names, accepted.request_id), timeout=10
    )
    assert [e.event_id for e in events] == [
        f"evt_{uuid.UUID(accepted.request_id).hex}_0",
        f"evt_{uuid.UUID(accepted.request_id).hex}_1",
    ]
    assert [e.progress.images_done for e in events] == [1, 2]


async def _two_events(
    client: redis.asyncio.Redis, names: StreamNames, request_id: str
) -> list[request_pb2.RequestEvent] | None:
    events = await finished_events(client, names, request_id)
    return events if len(events) == 2 else None


async def test_trimming_never_drops_an_unacknowledged_entry(
    redis_client: redis.asyncio.Redis, names: StreamNames
) -> None:
    key = names.tasks
    ids = [await redis_client.xadd(key, {b"task": b"x"}) for _ in range(6)]
    await redis_client.xgroup_create(key, WORKER_GROUP, id="0")
    await redis_client.xgroup_create(key, "other", id="0")
    read: Any = await redis_client.xreadgroup(WORKER_GROUP, "c", {key: ">"}, count=4)
    delivered = [entry_id for entry_id, _ in read[0][1]]
    await redis_client.xack(key, WORKER_GROUP, delivered[0], delivered[1], delivered[3])
    await redis_client.xreadgroup("other", "c", {key: ">"}, count=6)
    await redis_client.xack(key, "other", *ids)

    trimmed = await trim_acknowledged(redis_client, key, keep_without_groups=None)

    entries: Any = await redis_client.xrange(key)
    remaining = [entry_id for entry_id, _ in entries]
    assert trimmed == 2
    assert remaining == ids[2:]  # ids[2] is pending in the workers group; 4 and 5 undelivered


async def test_images_waiting_for_their_turn_are_left_to_the_feeder(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    reconciler: Reconciler,
) -> None:
    """What an ingest crash between the commit and the release leaves: images in Postgres and
    nothing on the stream. The reconciler does not publish them (that would bypass the
    window and the turns); the feeder does, once it leads."""
    async with another_feeder_leads(pool):
        accepted = await upload(ingest_stub, csv_of([("1", "Shoe", ["http://a.example/1.jpg"])]))
        assert (await reconciler.reconcile_once()).republished == 0
        assert await redis_client.xlen(names.tasks) == 0
    assert len(await released_rows(pool, accepted.request_id)) == 1
    assert await redis_client.xlen(names.tasks) == 1


async def test_reconciler_republishes_a_release_a_crash_left_claimed_and_off_the_stream(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    reconciler: Reconciler,
    consumer: TaskConsumer,
) -> None:
    """A feeder killed between claiming a release and its XADD leaves the image released with
    no entry: the reconciler republishes it, once, and no older claim can take it back."""
    await consumer.ensure_group()  # as the worker the reconciler runs in does at its start
    async with another_feeder_leads(pool) as leader:
        accepted = await upload(ingest_stub, csv_of([("1", "Shoe", ["http://a.example/1.jpg"])]))
        (image,) = await image_rows(pool, accepted.request_id)
        # What the killed feeder did before it died.
        claim = await queries.claim_releases(leader, [(image["id"], None)])
        assert claim.image_ids == {image["id"]}

        assert (await reconciler.reconcile_once()).republished == 1
    (after,) = await image_rows(pool, accepted.request_id)
    assert after["enqueued_at"] > claim.token
    tasks = await stream_messages(redis_client, names.tasks, TASK_FIELD, task_pb2.ImageTask)
    assert [(t.image_id, t.input_url) for t in tasks] == [(image["id"], image["input_url"])]
    assert (await reconciler.reconcile_once()).republished == 0
    # The dead feeder's claim is spent: seen from it, the image is no longer to be claimed.
    async with pool.acquire() as conn:
        assert not (await queries.claim_releases(conn, [(image["id"], claim.token)])).image_ids


async def test_a_retry_allowed_fewer_images_than_have_failed_changes_nothing(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub, pool: asyncpg.Pool
) -> None:
    """A keyed retry charges images_per_day for the images Failed before it starts. If more
    failed since, it changes nothing and says how many (the servicer charges again): retrying
    only some would split a dedup leader from its followers, which fail together and would
    wait for it forever if retried without it."""
    repeated = "http://a.example/same.jpg"
    urls = ["http://a.example/0.jpg", repeated, repeated]  # a leader and its follower
    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", urls)]))
    request_id = uuid.UUID(accepted.request_id)
    rows = await image_rows(pool, accepted.request_id)
    async with pool.acquire() as conn:
        for row in rows:
            if row["leader_id"] is None:  # its followers fail with it
                await queries.record_image_failed(conn, row["id"], code="HTTP_ERROR", message="404")
        assert await queries.failed_images(conn, request_id, owner="") == 3
        assert await queries.failed_images(conn, request_id, owner="someone else") is None
        refused = await queries.retry_failed_images(conn, request_id, owner="", most=2)
        assert refused == queries.MoreFailed(3)
        assert await queries.failed_images(conn, request_id, owner="") == 3
        batch = await queries.retry_failed_images(conn, request_id, owner="", most=3)
    assert isinstance(batch, queries.RetryBatch)
    assert batch.retried == 3
    assert (batch.request.images_failed, batch.request.status) == (0, "Pending")
    after = await image_rows(pool, accepted.request_id)
    assert [r["status"] for r in after] == ["Pending"] * 3
