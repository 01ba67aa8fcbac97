"""Writers that share a request's image rows take them in id order, so none waits for another
in a cycle; a cycle Postgres breaks anyway costs a worker's record one more try (real
Postgres, real lock waits read from pg_stat_activity)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import pytest

from services.common.db import lifecycle, queries, webhooks
from services.worker import processor
from testing.databases import waits_for_a_lock
from testing.polling import wait_until_async
from tests.integration.test_record_batch import done, stored

pytestmark = pytest.mark.integration


async def out_of_id_order(
    pool: asyncpg.Pool, released_at: datetime | None = None
) -> tuple[int, int]:
    """Two Pending images of one request, the lower id stored after the higher, as releases and
    deferrals leave them: each writes a new row version (enqueued_at is indexed, so no HOT
    update) wherever its page or the free space map has room. A snapshot held meanwhile keeps
    the old versions from being pruned, so the versions fill the pages they land on and move
    on, until one lands after the other row. With `released_at`, both are left claimed for a
    release at that time, their entries not yet recorded; else only the first is released."""
    first, second = await stored(pool, ("http://a.example/1.jpg", "http://a.example/2.jpg"))
    if released_at is not None:
        await pool.execute("UPDATE images SET enqueued_at = $2 WHERE id = $1", second, released_at)
    async with pool.acquire() as pin, pin.transaction(isolation="repeatable_read"):
        await pin.fetchval("SELECT count(*) FROM images WHERE id = $1", first)
        for _ in range(5000):
            await pool.execute(
                """UPDATE images SET enqueued_at = COALESCE($2, clock_timestamp()),
                                     stream_entry_id = CASE WHEN $2 IS NULL THEN '1-0' END
                    WHERE id = $1""",
                first,
                released_at,
            )
            rows = await pool.fetch(
                "SELECT id FROM images WHERE id = ANY($1::bigint[]) ORDER BY ctid",
                [first, second],
            )
            if [r["id"] for r in rows] == [second, first]:
                return first, second
    raise AssertionError("the setup could not store the two rows out of id order")


@contextlib.asynccontextmanager
async def holding(pool: asyncpg.Pool, image_id: int) -> AsyncIterator[queries.Connection]:
    """A transaction that holds `image_id`, as a worker's record holds the lowest id of its
    batch first; it fails rather than wait more than 3 s for any further lock."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = '3s'")
        await conn.execute("SELECT 1 FROM images WHERE id = $1 FOR UPDATE", image_id)
        yield conn


async def test_a_cancel_takes_the_images_in_id_order_whatever_their_physical_order(
    pool: asyncpg.Pool,
) -> None:
    first, second = await out_of_id_order(pool)
    request_id = await pool.fetchval("SELECT request_id FROM images WHERE id = $1", first)
    owner = await pool.fetchval("SELECT owner FROM requests WHERE id = $1", request_id)
    async with pool.acquire() as observer, pool.acquire() as canceller:
        # The plan of a big request (a bitmap scan, which reads rows in physical order); a
        # two-image request would otherwise be read through the index, in id order.
        await canceller.execute("SET enable_indexscan = off")
        async with holding(pool, first) as worker:
            cancel = asyncio.create_task(
                lifecycle.cancel_request(canceller, request_id, owner, output_csv_key="x.csv")
            )
            await wait_until_async(
                lambda: waits_for_a_lock(observer, pid=canceller.get_server_pid()),
                message="the cancel to queue",
            )
            # The worker's record goes on to the next image. Had the cancel taken `second`
            # before queueing for `first`, this would wait for it: a cycle.
            await worker.execute("UPDATE images SET updated_at = now() WHERE id = $1", second)
        cancelled = await asyncio.wait_for(cancel, 30)
    assert isinstance(cancelled, lifecycle.Cancelled) and cancelled.changed
    assert cancelled.request.images_failed == 2


async def test_a_workers_record_takes_the_images_in_id_order_whatever_its_plan(
    pool: asyncpg.Pool,
) -> None:
    first, second = await out_of_id_order(pool)
    async with pool.acquire() as observer, pool.acquire() as recorder:
        # A hash join over a scan of the table, the plan of a small one: rows in physical
        # order. (test_record_batch.py forces the nested loop of a big table.)
        for plan in ("nestloop", "mergejoin", "indexscan", "bitmapscan"):
            await recorder.execute(f"SET enable_{plan} = off")
        async with holding(pool, first) as other:
            record = asyncio.create_task(
                queries.record_images_done(recorder, [done(first), done(second)])
            )
            await wait_until_async(
                lambda: waits_for_a_lock(observer, pid=recorder.get_server_pid()),
                message="the record to queue",
            )
            await other.execute("UPDATE images SET updated_at = now() WHERE id = $1", second)
        recorded = await asyncio.wait_for(record, 30)
    assert set(recorded) == {first, second}


async def test_claiming_releases_takes_the_images_in_id_order(pool: asyncpg.Pool) -> None:
    first, second = await out_of_id_order(pool)  # the first released, its entry lost
    seen = await pool.fetchval("SELECT enqueued_at FROM images WHERE id = $1", first)
    async with pool.acquire() as observer, pool.acquire() as feeder:
        await feeder.execute("SET enable_indexscan = off")
        await feeder.execute("SET enable_bitmapscan = off")
        async with holding(pool, first) as worker:
            # The images in the order of the tasks, the higher id first.
            claim = asyncio.create_task(
                queries.claim_releases(feeder, [(second, None), (first, seen)])
            )
            await wait_until_async(
                lambda: waits_for_a_lock(observer, pid=feeder.get_server_pid()),
                message="the claim to queue",
            )
            await worker.execute("UPDATE images SET updated_at = now() WHERE id = $1", second)
        claimed = await asyncio.wait_for(claim, 30)
    assert claimed.image_ids == {first, second}


async def test_recording_releases_takes_the_images_in_id_order(pool: asyncpg.Pool) -> None:
    released_at = datetime.now(UTC)
    first, second = await out_of_id_order(pool, released_at)
    claim = queries.Claim(frozenset({first, second}), released_at)
    async with pool.acquire() as observer, pool.acquire() as feeder:
        await feeder.execute("SET enable_indexscan = off")
        await feeder.execute("SET enable_bitmapscan = off")
        async with holding(pool, first) as worker:
            # The feeder's tasks in the order it released them, the higher id first.
            release = asyncio.create_task(
                queries.record_releases(feeder, claim, [second, first], ["2-0", "3-0"])
            )
            await wait_until_async(
                lambda: waits_for_a_lock(observer, pid=feeder.get_server_pid()),
                message="the recording to queue",
            )
            await worker.execute("UPDATE images SET updated_at = now() WHERE id = $1", second)
        await asyncio.wait_for(release, 30)
    rows = await pool.fetch(
        "SELECT stream_entry_id FROM images WHERE id = ANY($1::bigint[]) ORDER BY id",
        [first, second],
    )
    assert [r["stream_entry_id"] for r in rows] == ["3-0", "2-0"]


async def record_in_a_broken_cycle(
    pool: asyncpg.Pool, tries: int
) -> tuple[int, dict[int, queries.Counters] | BaseException]:
    """A cycle no order prevents: another transaction holds the request row and then wants the
    image the worker's record holds. The record waited first, so its deadlock check runs first
    and Postgres fails it; the other one (a long deadlock_timeout) goes on. The image and what
    the record came to."""
    (image_id,) = await stored(pool, ("http://a.example/1.jpg",))
    request_id = await pool.fetchval("SELECT request_id FROM images WHERE id = $1", image_id)
    async with pool.acquire() as observer, pool.acquire() as recorder, pool.acquire() as other:
        async with other.transaction():
            await other.execute("SET LOCAL deadlock_timeout = '60s'")
            await other.execute("SELECT 1 FROM requests WHERE id = $1 FOR UPDATE", request_id)
            record = asyncio.create_task(
                processor.record_images_done(recorder, [done(image_id)], tries=tries)
            )
            await wait_until_async(
                lambda: waits_for_a_lock(observer, pid=recorder.get_server_pid()),
                message="the record to queue",
            )
            await other.execute("SELECT 1 FROM images WHERE id = $1 FOR UPDATE", image_id)
        (outcome,) = await asyncio.wait_for(asyncio.gather(record, return_exceptions=True), 30)
    return image_id, outcome


async def test_a_record_that_postgres_fails_to_break_a_cycle_is_tried_again(
    pool: asyncpg.Pool,
) -> None:
    image_id, recorded = await record_in_a_broken_cycle(pool, tries=processor.RECORD_TRIES)
    assert isinstance(recorded, dict) and set(recorded) == {image_id}
    assert recorded[image_id].images_done == 1


async def test_without_tries_left_the_broken_cycle_is_the_callers(pool: asyncpg.Pool) -> None:
    _, outcome = await record_in_a_broken_cycle(pool, tries=1)
    assert isinstance(outcome, asyncpg.exceptions.DeadlockDetectedError)


async def test_a_request_being_deleted_is_not_reopened_by_a_retry(pool: asyncpg.Pool) -> None:
    (image_id,) = await stored(pool, ("http://a.example/1.jpg",))
    request_id = await pool.fetchval("SELECT request_id FROM images WHERE id = $1", image_id)
    owner = await pool.fetchval("SELECT owner FROM requests WHERE id = $1", request_id)
    async with pool.acquire() as conn:
        await queries.record_image_failed(conn, image_id, code="BLOCKED_ADDRESS", message="no")
        await pool.execute(
            "UPDATE requests SET status = 'Failed', completed_at = now() WHERE id = $1",
            request_id,
        )
        assert await lifecycle.mark_deleting(conn, request_id)  # the delete stops here
        assert await queries.retry_failed_images(conn, request_id, owner=owner) is None
    row = await pool.fetchrow(
        "SELECT r.status, i.status AS image FROM requests r JOIN images i"
        " ON i.request_id = r.id WHERE r.id = $1",
        request_id,
    )
    assert row is not None and (row["status"], row["image"]) == ("Failed", "Failed")


async def being_deleted(pool: asyncpg.Pool, owner: str) -> tuple[uuid.UUID, int]:
    """A final request of `owner` marked deleting, as a delete leaves it before its rows go;
    and its image."""
    (image_id,) = await stored(pool, ("http://a.example/1.jpg",), owner=owner)
    request_id = await pool.fetchval("SELECT request_id FROM images WHERE id = $1", image_id)
    await pool.execute(
        "UPDATE requests SET status = 'Completed', completed_at = now() WHERE id = $1",
        request_id,
    )
    async with pool.acquire() as conn:
        assert await lifecycle.mark_deleting(conn, request_id)
    return request_id, image_id


Step = Callable[[queries.Connection], Awaitable[object]]


async def delete_beside(pool: asyncpg.Pool, request_id: uuid.UUID, first: Step, then: Step) -> None:
    """delete_rows while another transaction runs `first`, then, once the delete waits for a
    lock, `then`; that transaction fails rather than wait over 3 s."""
    async with pool.acquire() as observer, pool.acquire() as deleter:
        async with pool.acquire() as other, other.transaction():
            await other.execute("SET LOCAL lock_timeout = '3s'")
            await first(other)
            delete = asyncio.create_task(lifecycle.delete_rows(deleter, request_id))
            await wait_until_async(
                lambda: waits_for_a_lock(observer, pid=deleter.get_server_pid()),
                message="the delete to queue",
            )
            await then(other)
        await asyncio.wait_for(delete, 30)
    assert await pool.fetchval("SELECT count(*) FROM requests WHERE id = $1", request_id) == 0


async def test_a_delete_takes_the_reusable_outputs_in_key_order(pool: asyncpg.Pool) -> None:
    """A worker recording a later request of the owner takes over the reusable outputs that
    the request being deleted holds, in key order; the delete's cascade went by its index (the
    rows' physical order, for one request)."""
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    deleted, image_id = await being_deleted(pool, owner)
    (later_image,) = await stored(pool, ("http://a.example/1.jpg",), owner=owner)
    later = await pool.fetchval("SELECT request_id FROM images WHERE id = $1", later_image)
    low, high = b"\x01" * 32, b"\x02" * 32
    for source in (high, low):  # the higher key stored first
        await pool.execute(
            """INSERT INTO reusable_outputs (owner, source_sha256, options_sha256, request_id,
                   image_id, output_key, bytes_out, width, height, kept_source)
               VALUES ($1, $2, $2, $3, $4, 'out.jpg', 1, 1, 1, false)""",
            owner,
            source,
            deleted,
            image_id,
        )
    take_over = (
        "UPDATE reusable_outputs SET request_id = $1 WHERE owner = $2 AND source_sha256 = $3"
    )
    await delete_beside(
        pool,
        deleted,
        lambda conn: conn.execute(take_over, later, owner, low),
        lambda conn: conn.execute(take_over, later, owner, high),
    )
    kept = await pool.fetch("SELECT request_id FROM reusable_outputs WHERE owner = $1", owner)
    assert [r["request_id"] for r in kept] == [later, later]  # the later request's now


async def test_a_delete_takes_the_webhook_deliveries_before_the_request(
    pool: asyncpg.Pool,
) -> None:
    """A sender recording a failed attempt holds the delivery, then inserts the next attempt,
    which needs the request row; the delete's cascade held the request row first."""
    request_id, _ = await being_deleted(pool, f"owner-{uuid.uuid4().hex[:8]}")
    async with pool.acquire() as conn:
        assert await webhooks.schedule_first_attempt(
            conn,
            request_id=request_id,
            event_id=f"evt-{uuid.uuid4().hex}",
            event_type="request.completed",
            url="http://127.0.0.1:9/hook",
            payload="{}",
        )
    # The sender's record_attempt, its two statements.
    failed = "UPDATE webhook_deliveries SET state = 'failed' WHERE request_id = $1"
    next_attempt = """
        INSERT INTO webhook_deliveries (request_id, event_id, attempt, event_type, url, payload,
                                        state, next_attempt_at)
        SELECT request_id, event_id, attempt + 1, event_type, url, payload, 'scheduled', now()
          FROM webhook_deliveries WHERE request_id = $1"""
    await delete_beside(
        pool,
        request_id,
        lambda conn: conn.execute(failed, request_id),
        lambda conn: conn.execute(next_attempt, request_id),
    )
    assert not await pool.fetchval(
        "SELECT count(*) FROM webhook_deliveries WHERE request_id = $1", request_id
    )
