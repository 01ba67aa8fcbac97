"""record_images_done against real Postgres: many images' outcomes, their followers, the
counters and the owner's reusable outputs in one statement (services/worker/batching.py gathers
the batches)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from services.common.csv_format import ProductRow
from services.common.db import queries
from testing.polling import wait_until_async

pytestmark = pytest.mark.integration


async def stored(pool: asyncpg.Pool, urls: tuple[str, ...], owner: str = "acme") -> list[int]:
    """A committed request of one product with `urls` (repeats become followers, as ingest
    leaves them); its image ids in CSV order."""
    request_id = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        await queries.insert_request(
            conn, request_id, options={}, webhook_url=None, owner=owner, idempotency_key=None
        )
        await queries.insert_products(conn, request_id, [ProductRow(2, "1", "Shoe", urls)])
        await queries.link_repeated_urls(conn, request_id)
        await queries.complete_request_insert(
            conn, request_id, products_total=1, images_total=len(urls), content_hash=b""
        )
    rows = await pool.fetch(
        "SELECT id FROM images WHERE request_id = $1 ORDER BY position", request_id
    )
    return [row["id"] for row in rows]


def done(
    image_id: int, bytes_out: int = 50, digests: queries.SourceDigests | None = None
) -> queries.DoneImage:
    output = queries.StoredOutput(
        image_id, f"out/{image_id}.jpg", bytes_out, 8, 8, False, 0.98, 50, None
    )
    return queries.DoneImage(output, bytes_in=100, digests=digests)


async def test_one_statement_records_a_batch_its_followers_and_the_counters(
    pool: asyncpg.Pool,
) -> None:
    first, second, repeat = await stored(
        pool, ("http://a.example/1.jpg", "http://a.example/2.jpg", "http://a.example/1.jpg")
    )
    async with pool.acquire() as conn:
        recorded = await queries.record_images_done(conn, [done(first), done(second, 70)])

    assert set(recorded) == {first, second}
    counters = recorded[first]
    assert counters == recorded[second]  # the request's counters after the whole statement
    assert (counters.images_done, counters.images_failed, counters.all_final) == (3, 0, True)
    assert (counters.bytes_in, counters.bytes_out) == (300, 170)  # the repeat counts too
    assert counters.ssim_count == 3
    rows = {
        r["id"]: r
        for r in await pool.fetch(
            "SELECT id, status, output_key, attempts FROM images WHERE id = ANY($1::bigint[])",
            [first, second, repeat],
        )
    }
    assert all(r["status"] == "Done" for r in rows.values())
    assert rows[repeat]["output_key"] == rows[first]["output_key"] == f"out/{first}.jpg"
    assert (rows[first]["attempts"], rows[second]["attempts"]) == (1, 1)


async def test_an_image_already_final_is_left_out_and_the_rest_are_recorded(
    pool: asyncpg.Pool,
) -> None:
    first, second = await stored(pool, ("http://a.example/1.jpg", "http://a.example/2.jpg"))
    async with pool.acquire() as conn:
        assert set(await queries.record_images_done(conn, [done(first)])) == {first}
        # Delivered again (first) in a batch with a new one (second).
        recorded = await queries.record_images_done(conn, [done(first, 999), done(second)])
    assert set(recorded) == {second}
    assert recorded[second].images_done == 2
    assert recorded[second].bytes_out == 100  # the first outcome stands, counted once


async def test_outputs_of_the_same_source_in_one_batch_are_remembered_once(
    pool: asyncpg.Pool,
) -> None:
    """Two URLs with the same bytes (and options): one row in reusable_outputs, the later
    image's; a second row for the same key in one INSERT would abort the whole statement."""
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    first, second = await stored(
        pool, ("http://a.example/a.jpg", "http://b.example/a.jpg"), owner=owner
    )
    same = queries.SourceDigests(b"s" * 32, b"o" * 32)
    async with pool.acquire() as conn:
        recorded = await queries.record_images_done(
            conn, [done(first, digests=same), done(second, digests=same)]
        )
    assert set(recorded) == {first, second}
    remembered = await pool.fetch("SELECT image_id FROM reusable_outputs WHERE owner = $1", owner)
    assert [r["image_id"] for r in remembered] == [max(first, second)]


async def test_two_batches_with_the_same_images_in_opposite_orders_do_not_deadlock(
    pool: asyncpg.Pool,
) -> None:
    # Redelivered tasks can put one image in two workers' batches. A third connection holds
    # the first image, so the batch [first, second] queues for it holding nothing, and the
    # batch [second, first] takes second and queues behind it. Locking in batch order, the
    # first batch then waits for second while the other waits for first: a deadlock.
    first, second = await stored(pool, ("http://a.example/1.jpg", "http://a.example/2.jpg"))
    # The plan of a real images table: a loop over the batch, an index lookup each, so rows
    # are locked in batch order. On a nearly empty table Postgres scans it in physical order.
    await stored(pool, tuple(f"http://a.example/filler/{i}.jpg" for i in range(3000)))
    await pool.execute("ANALYZE images")
    async with pool.acquire() as holder, pool.acquire() as a, pool.acquire() as b:
        pids = {await conn.fetchval("SELECT pg_backend_pid()") for conn in (a, b)}

        async def waiting(count: int) -> bool:
            blocked = await holder.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE pid = ANY($1::int[]) AND wait_event_type = 'Lock'",
                list(pids),
            )
            return bool(blocked >= count)

        hold = holder.transaction()
        await hold.start()
        await holder.execute("SELECT 1 FROM images WHERE id = $1 FOR UPDATE", first)
        forward = asyncio.create_task(queries.record_images_done(a, [done(first), done(second)]))
        await wait_until_async(lambda: waiting(1), message="the first batch queued")
        backward = asyncio.create_task(queries.record_images_done(b, [done(second), done(first)]))
        await wait_until_async(lambda: waiting(2), message="the second batch queued")
        await hold.rollback()
        results = await asyncio.wait_for(
            asyncio.gather(forward, backward, return_exceptions=True), timeout=30
        )
    assert not [r for r in results if isinstance(r, BaseException)], results
    recorded = [set(r) for r in results if not isinstance(r, BaseException)]
    assert set().union(*recorded) == {first, second}  # each image recorded once, by either
    assert sum(len(r) for r in recorded) == 2


async def test_one_query_finds_each_owners_earlier_outputs_in_the_order_asked(
    pool: asyncpg.Pool,
) -> None:
    """The worker's batched lookup: each answer is the asking request's owner's output for
    those digests, never another owner's, and a miss is None in its place."""
    ours, theirs = (f"owner-{uuid.uuid4().hex[:8]}" for _ in range(2))
    same, other = (queries.SourceDigests(bytes([n]) * 32, b"o" * 32) for n in (1, 2))
    (our_image,) = await stored(pool, ("http://a.example/a.jpg",), owner=ours)
    (their_image,) = await stored(pool, ("http://b.example/a.jpg",), owner=theirs)
    async with pool.acquire() as conn:
        await queries.record_images_done(conn, [done(our_image, 40, digests=same)])
        await queries.record_images_done(conn, [done(their_image, 60, digests=same)])
        our_request, their_request = [
            await conn.fetchval("SELECT request_id FROM images WHERE id = $1", image)
            for image in (our_image, their_image)
        ]
        found = await queries.find_reusable_outputs(
            conn,
            [
                (our_request, same),
                (their_request, same),
                (our_request, other),
                (their_request, same),
            ],
        )
        assert await queries.find_reusable_outputs(conn, []) == []

    assert [f and (f.image_id, f.bytes_out) for f in found] == [
        (our_image, 40),
        (their_image, 60),
        None,
        (their_image, 60),
    ]
    assert found[0] is not None
    assert found[0].output_key == f"out/{our_image}.jpg"
    assert found[0].ssim == pytest.approx(0.98)  # stored as a real
