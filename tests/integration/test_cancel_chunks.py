"""A cancel fails a request's images a chunk at a time (services/common/db/lifecycle.py): no
statement holds many of its rows, whoever waits on one waits for one chunk, and a cancel that
dies half way is finished by the reconciler. Real Postgres and Redis; lock waits are read
from pg_stat_activity."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
import redis.asyncio

from services.common import storage as keys
from services.common.db import lifecycle, queries
from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.storage import Storage
from services.common.streams import EVENT_FIELD, StreamNames
from services.worker.processor import Processor
from services.worker.reconciler import Reconciler
from testing.databases import own_database, waits_for_a_lock
from testing.polling import wait_until_async
from tests.integration.flows import stream_messages
from tests.integration.test_lock_order import holding
from tests.integration.test_record_batch import done, stored

pytestmark = pytest.mark.integration

URLS = tuple(f"http://a.example/{n}.jpg" for n in range(10))


@pytest.fixture
async def pool(postgres_server_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A database of this test's own: the reconciler scans every request in its database."""
    async with own_database(postgres_server_url, "imgpipe_cancel") as pool:
        yield pool


async def request_of(pool: asyncpg.Pool, image_id: int) -> uuid.UUID:
    request_id: uuid.UUID = await pool.fetchval(
        "SELECT request_id FROM images WHERE id = $1", image_id
    )
    return request_id


async def statuses(pool: asyncpg.Pool, image_ids: list[int]) -> list[tuple[str, str | None]]:
    rows = await pool.fetch(
        "SELECT status, error_code FROM images WHERE id = ANY($1::bigint[]) ORDER BY id",
        image_ids,
    )
    return [(r["status"], r["error_code"]) for r in rows]


async def cancel_queued(
    observer: queries.Connection, canceller: queries.Connection, request_id: uuid.UUID
) -> asyncio.Task[lifecycle.Cancelled | queries.RequestRow | None]:
    """A cancel in chunks of 3 images, started and queued for an image another transaction
    holds."""
    cancel = asyncio.create_task(
        lifecycle.cancel_request(canceller, request_id, "acme", output_csv_key="x.csv", chunk=3)
    )
    await wait_until_async(
        lambda: waits_for_a_lock(observer, pid=canceller.get_server_pid()),
        message="the cancel to queue for the held image",
    )
    return cancel


async def test_a_cancel_commits_each_chunk_and_holds_no_row_while_it_waits_for_one(
    pool: asyncpg.Pool,
) -> None:
    ids = await stored(pool, URLS)
    request_id = await request_of(pool, ids[0])
    async with pool.acquire() as observer, pool.acquire() as canceller:
        # A worker holds the first image of the second chunk while it records it.
        async with holding(pool, ids[3]) as worker:
            cancel = await cancel_queued(observer, canceller, request_id)
            # The first chunk is committed, counted, and none of its rows is held: another
            # writer (a late record, the feeder, a worker's record of the request) locks its
            # images and the request row at once. Under one statement for the whole request,
            # these would wait for it, and it for the worker.
            assert await statuses(pool, ids[:3]) == [("Failed", queries.CANCELLED_CODE)] * 3
            async with observer.transaction():
                await observer.execute("SET LOCAL lock_timeout = '1s'")
                await observer.execute(
                    "SELECT 1 FROM images WHERE id = ANY($1::bigint[]) FOR UPDATE", ids[:3]
                )
                failed = await observer.fetchval(
                    "SELECT images_failed FROM requests WHERE id = $1 FOR UPDATE", request_id
                )
            assert failed == 3
            # The worker's record of the image it holds commits first: it is Done.
            await queries.record_images_done(worker, [done(ids[3])])
        cancelled = await asyncio.wait_for(cancel, 30)
    assert isinstance(cancelled, lifecycle.Cancelled) and cancelled.changed
    assert cancelled.request.status == "Cancelled"
    assert (cancelled.request.images_done, cancelled.request.images_failed) == (1, 9)
    assert (
        await statuses(pool, ids)
        == [("Failed", queries.CANCELLED_CODE)] * 3
        + [("Done", None)]
        + [("Failed", queries.CANCELLED_CODE)] * 6
    )


async def test_a_request_being_cancelled_is_left_alone_by_the_feeder_workers_and_retries(
    pool: asyncpg.Pool,
) -> None:
    """Marked (the cancel's first step, then its process died): nothing starts, nothing
    finishes it, a retry is refused; a late result of an image in flight is still recorded."""
    ids = await stored(pool, URLS[:4])
    request_id = await request_of(pool, ids[0])
    other = await request_of(pool, (await stored(pool, URLS[:1]))[0])
    async with pool.acquire() as conn:
        # All its tasks released (published_at): only the cancel is left to finish it.
        await conn.execute("UPDATE requests SET published_at = now() WHERE id = $1", request_id)
        assert await lifecycle.mark_cancel(conn, request_id)
        waiting = await queries.waiting_requests(conn, up_to=10, limit=10)
        assert [w.request_id for w in waiting] == [other]
        states = await queries.image_states(conn, ids)
        assert all(s.cancelling and not s.startable for s in states.values())
        retried = await queries.retry_failed_images(conn, request_id, owner="acme")
        assert isinstance(retried, queries.BeingCancelled)
        # Every image ends before the cancel goes on: still, no worker finishes the request.
        await queries.record_image_failed(conn, ids[0], code="NOT_FOUND", message="404")
        await queries.record_images_done(conn, [done(i) for i in ids[1:]])
        assert await queries.finish_request(conn, request_id, output_csv_key="x.csv") is None
        assert await queries.unfinished_complete_requests(conn, min_age_seconds=0, limit=10) == []
        counters = await queries.counters(conn, request_id)
    assert counters is not None and counters.all_final and counters.status == "Processing"


async def test_a_retry_while_a_cancel_runs_answers_conflict_and_changes_nothing(
    pool: asyncpg.Pool, ingest_stub: ingest_grpc.IngestServiceAsyncStub
) -> None:
    ids = await stored(pool, URLS[:3], owner="")  # no API keys: the owner is ""
    request_id = await request_of(pool, ids[0])
    async with pool.acquire() as conn:
        await queries.record_image_failed(conn, ids[0], code="NOT_FOUND", message="404")
        assert await lifecycle.mark_cancel(conn, request_id)
    retry = ingest_pb.RetryFailedImagesRequest(request_id=str(request_id))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ingest_stub.RetryFailedImages(retry, timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "being cancelled" in str(refused.value.details())
    assert await statuses(pool, ids[:1]) == [("Failed", "NOT_FOUND")]


async def test_a_result_that_lands_after_its_chunk_is_recorded_done(pool: asyncpg.Pool) -> None:
    ids = await stored(pool, URLS[:6])
    request_id = await request_of(pool, ids[0])
    async with pool.acquire() as observer, pool.acquire() as canceller:
        async with holding(pool, ids[3]):
            cancel = await cancel_queued(observer, canceller, request_id)
            # Image 1 was in flight: its chunk failed it CANCELLED, then its result arrives.
            recorded = await queries.record_images_done(observer, [done(ids[1])])
            assert recorded[ids[1]].images_done == 1
        cancelled = await asyncio.wait_for(cancel, 30)
    assert isinstance(cancelled, lifecycle.Cancelled)
    assert (cancelled.request.images_done, cancelled.request.images_failed) == (1, 5)
    assert (await statuses(pool, [ids[1]])) == [("Done", None)]


async def test_the_reconciler_finishes_a_cancel_whose_process_died(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    storage: Storage,
    processor: Processor,
) -> None:
    ids = await stored(pool, URLS[:5])
    request_id = await request_of(pool, ids[0])
    async with pool.acquire() as conn:
        await queries.record_images_done(conn, [done(ids[0])])
        assert await lifecycle.mark_cancel(conn, request_id)  # and then the process died
    reconciler = Reconciler(
        pool=pool, redis=redis_client, names=names, processor=processor, min_age=0
    )
    result = await reconciler.reconcile_once()
    assert result.cancelled == 1
    async with pool.acquire() as conn:
        request = await lifecycle.visible_request(conn, request_id, "acme")
    assert request is not None and request.status == "Cancelled"
    assert (request.images_done, request.images_failed) == (1, 4)
    assert request.completed_at is not None
    csv = await storage.get(keys.output_csv_key(request_id))
    assert queries.CANCELLED_CODE in csv.decode()
    events = await stream_messages(
        redis_client, names.events, EVENT_FIELD, request_pb2.RequestEvent
    )
    (event,) = [e for e in events if e.request_id == str(request_id)]
    assert event.status == request_pb2.REQUEST_STATUS_CANCELLED
    # Published, and done: the next pass finds nothing to finish or publish.
    again = await reconciler.reconcile_once()
    assert (again.cancelled, again.finished, again.events) == (0, 0, 0)
