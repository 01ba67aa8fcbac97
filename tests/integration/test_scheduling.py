"""The feeder against real Postgres and Redis: a bounded window, fair turns, retries through
the feeder (docs/scheduling.md). One pass at a time, called directly."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio
from prometheus_client import REGISTRY

from services.common.csv_format import ProductRow
from services.common.db import queries
from services.common.pb.imgpipe.v1 import task_pb2
from services.common.publish import publish_releases
from services.common.servicer_errors import BACKEND_ERRORS
from services.common.streams import TASK_FIELD, StreamNames, TaskConsumer
from services.ingest.feeder import STARVED_TTL_MS, Feeder, FeedPass
from services.ingest.lookahead import LEAST
from testing.databases import own_database, waits_for_a_lock
from testing.polling import wait_until_async
from testing.ports import free_tcp_port
from tests.integration.flows import stream_messages

pytestmark = pytest.mark.integration

WINDOW = 6


@pytest.fixture
async def pool(postgres_server_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A database of this test's own: the feeder counts its window over the whole database."""
    async with own_database(postgres_server_url, "imgpipe_scheduling") as pool:
        yield pool


def passes_apart() -> Callable[[], float]:
    """A clock for the feeder that says 0.1 s passed between its passes, as at its poll."""
    ticks = itertools.count()
    return lambda: next(ticks) * 0.1


@pytest.fixture
def feeder(pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames) -> Feeder:
    return Feeder(
        pool=pool,
        redis=redis_client,
        names=names,
        window=WINDOW,
        weights={"acme": 2},
        clock=passes_apart(),
    )


async def stored(pool: asyncpg.Pool, images: int, owner: str = "") -> uuid.UUID:
    """A committed request of `images` images, as ingest leaves it: nothing released."""
    request_id = uuid.uuid4()
    urls = tuple(f"http://a.example/{request_id}/{i}.jpg" for i in range(images))
    async with pool.acquire() as conn, conn.transaction():
        await queries.insert_request(
            conn, request_id, options={}, webhook_url=None, owner=owner, idempotency_key=None
        )
        await queries.insert_products(conn, request_id, [ProductRow(2, "1", "Shoe", urls)])
        await queries.complete_request_insert(
            conn, request_id, products_total=1, images_total=images, content_hash=b""
        )
    return request_id


async def on_stream(client: redis.asyncio.Redis, names: StreamNames) -> Counter[str]:
    tasks = await stream_messages(client, names.tasks, TASK_FIELD, task_pb2.ImageTask)
    return Counter(t.request_id for t in tasks)


async def finish(pool: asyncpg.Pool, request_id: uuid.UUID, count: int) -> None:
    """`count` of the request's released images recorded Done, as workers would."""
    rows = await pool.fetch(
        """SELECT id FROM images WHERE request_id = $1 AND status = 'Pending'
              AND enqueued_at IS NOT NULL ORDER BY id LIMIT $2""",
        request_id,
        count,
    )
    async with pool.acquire() as conn:
        for row in rows:
            await queries.record_image_done(
                conn,
                row["id"],
                output_key="k",
                bytes_in=1,
                bytes_out=1,
                width=1,
                height=1,
                kept_source=False,
            )


async def test_the_window_bounds_what_is_on_the_stream(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, feeder: Feeder
) -> None:
    big = await stored(pool, 50)

    first = await feeder.feed_once()
    assert (first.released, first.in_window) == (WINDOW, 0)
    assert (await feeder.feed_once()).released == 0  # full: nothing more until images finish
    assert await redis_client.xlen(names.tasks) == WINDOW

    await finish(pool, big, 2)
    assert (await feeder.feed_once()).released == 2
    assert await redis_client.xlen(names.tasks) == WINDOW + 2


@pytest.fixture
async def worker(redis_client: redis.asyncio.Redis, names: StreamNames) -> TaskConsumer:
    """A worker's consumer: what it reads is in its hands (delivered, pending) until acked."""
    consumer = TaskConsumer(redis_client, names, "worker-1")
    await consumer.ensure_group()
    return consumer


async def test_a_new_request_takes_turns_with_a_running_one(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    feeder: Feeder,
    worker: TaskConsumer,
) -> None:
    big = await stored(pool, 50)
    await feeder.feed_once()
    await worker.read(WINDOW, block_ms=0)
    small = await stored(pool, 3)

    await finish(pool, big, 4)
    await feeder.feed_once()

    # The big request's tasks hold 2 slots: of the four free places the newcomer gets all it
    # has (3), not the last of 50.
    assert await on_stream(redis_client, names) == {str(big): WINDOW + 1, str(small): 3}


async def test_an_owner_whose_images_take_long_gives_way_as_its_slots_free(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    feeder: Feeder,
    worker: TaskConsumer,
) -> None:
    slow = await stored(pool, 50, owner="globex")  # weight 1, like prompt
    await feeder.feed_once()  # alone: it takes the whole window
    await worker.read(WINDOW, block_ms=0)
    prompt = await stored(pool, 50, owner="initech")

    await finish(pool, slow, 2)  # two of its long images end
    for _ in range(6):
        await feeder.feed_once()
        await worker.read(WINDOW, block_ms=0)
        await finish(pool, prompt, WINDOW)  # prompt images end as soon as a worker has them

    # Every free place went to the prompt owner, which held fewer slots than the slow one.
    assert await on_stream(redis_client, names) == {str(slow): WINDOW, str(prompt): 12}


async def test_tasks_still_on_the_stream_hold_no_slot(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    feeder: Feeder,
    worker: TaskConsumer,
) -> None:
    first = await stored(pool, 50, owner="globex")
    await feeder.feed_once()
    await worker.read(2, block_ms=0)  # 2 in a worker's hands, 4 waiting on the stream
    second = await stored(pool, 50, owner="initech")

    await finish(pool, first, 2)  # the two in hand end
    await feeder.feed_once()

    # Neither owner's tasks hold a slot now, so the two places alternate, oldest first: the
    # first owner's 4 tasks on the stream do not count against it.
    assert await on_stream(redis_client, names) == {str(first): 7, str(second): 1}


async def test_the_lookahead_bounds_what_waits_for_a_worker(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, worker: TaskConsumer
) -> None:
    feeder = Feeder(pool=pool, redis=redis_client, names=names, window=WINDOW, lookahead=3)
    await stored(pool, 50)

    assert (await feeder.feed_once()).released == 3
    assert (await feeder.feed_once()).released == 0  # three wait for a worker: no more

    await worker.read(2, block_ms=0)  # a worker takes two: two more may wait
    assert (await feeder.feed_once()).released == 2
    await worker.read(3, block_ms=0)  # it takes the other three: the window (6) has one place
    assert (await feeder.feed_once()).released == 1
    assert (await feeder.feed_once()).released == 0


async def test_the_lookahead_follows_what_the_workers_take(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, worker: TaskConsumer
) -> None:
    """Long tasks leave the stream slowly, so few wait there: a newcomer waits behind the
    work the workers take in `lookahead_seconds`, not behind `lookahead` tasks."""
    feeder = Feeder(
        pool=pool,
        redis=redis_client,
        names=names,
        window=100,
        lookahead=32,
        lookahead_seconds=0.5,
        clock=passes_apart(),
    )
    heavy = await stored(pool, 80, owner="globex")
    assert (await feeder.feed_once()).released == 32  # idle workers take whatever comes
    await worker.read(32, block_ms=0)

    # The workers hold 32 and none has ended: the turnover is unknown, so LEAST may wait.
    assert (await feeder.feed_once()).released == LEAST
    assert REGISTRY.get_sample_value("imgpipe_feeder_lookahead_tasks") == LEAST
    assert (await feeder.feed_once()).released == 0

    newcomer = await stored(pool, 10, owner="initech")
    await finish(pool, heavy, 2)  # two long tasks end, and their slots take two entries
    await worker.read(2, block_ms=0)
    second = await feeder.feed_once()
    assert (second.lookahead, second.released) == (LEAST, 2)  # fair share: the newcomer's
    assert (await on_stream(redis_client, names))[str(newcomer)] == 2

    # Prompt tasks turn the slots over quickly: more may wait.
    await worker.read(4, block_ms=0)
    await finish(pool, newcomer, 2)
    await finish(pool, heavy, 2)
    third = await feeder.feed_once()
    assert third.lookahead == 2 + 4
    assert REGISTRY.get_sample_value("imgpipe_feeder_lookahead_tasks") == 2 + 4
    assert third.released == 6


async def test_a_request_with_nothing_on_a_full_stream_is_reported_starved_until_released(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, worker: TaskConsumer
) -> None:
    """The workers' tasks waiting for a busy origin give their slots back when told: each
    takes an entry off the stream, which makes room (docs/scheduling.md)."""
    feeder = Feeder(pool=pool, redis=redis_client, names=names, window=WINDOW, lookahead=3)
    await stored(pool, 50)
    assert (await feeder.feed_once()).released == 3
    await feeder.feed_once()
    # The first request waits too, but it has tasks on the stream: nobody is starved.
    assert await redis_client.get(names.starved) is None

    newcomer = await stored(pool, 5)
    await feeder.feed_once()
    assert await redis_client.get(names.starved) == b"1"
    assert 0 < await redis_client.pttl(names.starved) <= STARVED_TTL_MS  # gone with the feeder

    await worker.read(1, block_ms=0)  # an entry leaves the stream: room for the newcomer
    assert (await feeder.feed_once()).released == 1
    assert (await on_stream(redis_client, names))[str(newcomer)] == 1
    assert await redis_client.get(names.starved) is None


async def test_owners_share_by_weight(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, feeder: Feeder
) -> None:
    acme = await stored(pool, 50, owner="acme")  # weight 2
    globex = await stored(pool, 50, owner="globex")  # weight 1 (no weight configured)

    await feeder.feed_once()

    assert await on_stream(redis_client, names) == {str(acme): 4, str(globex): 2}


async def test_retried_images_wait_for_the_feeder(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, feeder: Feeder
) -> None:
    request_id = await stored(pool, 2)
    await feeder.feed_once()
    async with pool.acquire() as conn:
        for row in await pool.fetch("SELECT id FROM images WHERE request_id = $1", request_id):
            await queries.record_image_failed(conn, row["id"], code="TIMEOUT", message="slow")
        batch = await queries.retry_failed_images(conn, request_id, owner="")
    assert isinstance(batch, queries.RetryBatch) and batch.retried == 2
    assert await redis_client.xlen(names.tasks) == 2  # the retry itself published nothing

    assert (await feeder.feed_once()).released == 2
    assert await on_stream(redis_client, names) == {str(request_id): 4}


async def test_a_request_with_nothing_left_to_release_is_marked_published(
    pool: asyncpg.Pool, feeder: Feeder
) -> None:
    request_id = await stored(pool, 3)
    await feeder.feed_once()
    published = await pool.fetchval("SELECT published_at FROM requests WHERE id = $1", request_id)
    assert published is not None


def test_a_pass_is_idle_only_for_a_leader_with_nothing_in_flight_or_released() -> None:
    assert FeedPass().idle
    assert not FeedPass(in_window=1).idle
    assert not FeedPass(released=1).idle
    assert not FeedPass(leader=False).idle  # another replica's pass: look again soon


async def test_an_idle_feeder_still_answers_a_wake_and_a_stop_at_once(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames
) -> None:
    # An idle pause of a minute: only a wake (a commit) or the stop can end it within the test.
    feeder = Feeder(
        pool=pool, redis=redis_client, names=names, window=WINDOW, poll=0.01, idle_poll=60
    )
    passes: list[FeedPass] = []
    feed_once = feeder.feed_once

    async def counted() -> FeedPass:
        passes.append(await feed_once())
        return passes[-1]

    feeder.feed_once = counted  # type: ignore[method-assign]
    stop = asyncio.Event()
    running = asyncio.create_task(feeder.run(stop))
    try:

        async def idle() -> bool:
            return bool(passes) and passes[-1].idle

        await wait_until_async(idle, message="an idle pass")
        request_id = await stored(pool, 2)
        feeder.wake()  # what ingest does after the commit

        async def released() -> bool:
            return (await on_stream(redis_client, names))[str(request_id)] == 2

        await wait_until_async(released, timeout=10, message="the request released")
        # Cleared before the images are done: the feeder's pass may see them done before
        # finish() returns, and that idle pass (before a pause of a minute) must stay counted.
        passes.clear()
        await finish(pool, request_id, 2)
        await wait_until_async(idle, message="idle again once the images are done")
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=10)  # within the idle pause, not after it


async def defer(pool: asyncpg.Pool, image_id: int, seconds: float, **kwargs: Any) -> bool:
    async with pool.acquire() as conn:
        return await queries.defer_image(conn, image_id, seconds, **kwargs)


async def image_ids(pool: asyncpg.Pool, request_id: uuid.UUID) -> list[int]:
    rows = await pool.fetch("SELECT id FROM images WHERE request_id = $1 ORDER BY id", request_id)
    return [row["id"] for row in rows]


async def test_a_deferred_image_is_released_again_only_once_it_is_due(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, feeder: Feeder
) -> None:
    request_id = await stored(pool, 3)
    await feeder.feed_once()
    later, due, untouched = await image_ids(pool, request_id)
    # Workers put two of them back to wait: one for an hour, one not at all.
    assert await defer(pool, later, 3600)
    assert await defer(pool, due, 0)
    async with pool.acquire() as conn:
        states = await queries.image_states(conn, [later, due, untouched])
        next_due = await queries.next_due(conn)
    assert [states[i].startable for i in (later, due, untouched)] == [False, True, True]
    assert next_due is not None and 3590 < next_due <= 3600

    assert (await feeder.feed_once()).released == 1
    tasks = await stream_messages(redis_client, names.tasks, TASK_FIELD, task_pb2.ImageTask)
    assert [t.image_id for t in tasks] == [later, due, untouched, due]
    row = await pool.fetchrow(
        "SELECT enqueued_at, stream_entry_id FROM images WHERE id = $1", later
    )
    assert row is not None and tuple(row) == (None, None)


async def test_an_image_put_back_before_its_release_was_recorded_stays_waiting(
    pool: asyncpg.Pool,
) -> None:
    """A worker may take a task and put its image back between the feeder's XADD and its
    recording of the entry: the record must not mark the waiting image released again."""
    request_id = await stored(pool, 1)
    (image_id,) = await image_ids(pool, request_id)
    async with pool.acquire() as conn:
        claim = await queries.claim_releases(conn, [(image_id, None)])
        assert claim.image_ids == {image_id}
        assert await defer(pool, image_id, 3600)
        await queries.record_releases(conn, claim, [image_id], ["1-0"])
    row = await pool.fetchrow(
        "SELECT enqueued_at, stream_entry_id FROM images WHERE id = $1", image_id
    )
    assert row is not None and tuple(row) == (None, None)


async def test_recording_a_release_never_waits_for_an_image_that_is_final_already(
    pool: asyncpg.Pool,
) -> None:
    """A deadlock a CI run hit, which Postgres broke by failing the feeder's statement (and the
    feeder's crash stopped ingest). A worker failed an image between the feeder's XADD and its
    recording of the entry. A retry of the request then held the request row and waited for
    that image's row; another worker, failing the request's next image, held that one and
    waited for the request row; and the recording held the failed image and waited for the
    next. A final image needs no stream entry: the recording must leave its row alone, and so
    never wait for whoever holds it."""
    request_id = await stored(pool, 1)
    (image_id,) = await image_ids(pool, request_id)
    async with pool.acquire() as conn:
        claim = await queries.claim_releases(conn, [(image_id, None)])
        await queries.record_image_failed(conn, image_id, code="BLOCKED_ADDRESS", message="no")
    # The retry's locks: the request row, then the failed image, turned Pending (not yet
    # committed).
    async with pool.acquire() as retry, pool.acquire() as feeder, retry.transaction():
        await retry.execute("SELECT 1 FROM requests WHERE id = $1 FOR UPDATE", request_id)
        await retry.execute(
            "UPDATE images SET status = 'Pending', enqueued_at = NULL WHERE id = $1", image_id
        )
        await feeder.execute("SET lock_timeout = '2s'")  # waiting raises, and fails the test
        await queries.record_releases(feeder, claim, [image_id], ["1-0"])
    # Retried, it waits for the feeder's next pass, unreleased.
    row = await pool.fetchrow(
        "SELECT status, enqueued_at, stream_entry_id FROM images WHERE id = $1", image_id
    )
    assert row is not None and tuple(row) == ("Pending", None, None)


async def test_an_image_retried_during_its_release_gets_a_task_a_worker_can_take(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    feeder: Feeder,
    worker: TaskConsumer,
) -> None:
    """A CI run saw this one: a worker took a task between the feeder's XADD and its recording
    of the entry, failed the image, and a retry put it back to wait; the late recording then
    marked the retried image released, under an entry already acknowledged. No worker had it,
    and the feeder no longer offered it, until the reconciler found the entry gone, 10 to 40 s
    later. Here the test holds the image's row while the pass runs, and plays the worker and
    the retry in that time; whatever the pass did first, the image must end with a task on the
    stream for a worker, or waiting for the next pass to give it one."""
    request_id = await stored(pool, 1)
    (image_id,) = await image_ids(pool, request_id)
    async with pool.acquire() as observer, pool.acquire() as hand:
        async with hand.transaction():
            await hand.execute("SELECT 1 FROM images WHERE id = $1 FOR UPDATE", image_id)
            feed = asyncio.create_task(feeder.feed_once())
            await wait_until_async(
                lambda: waits_for_a_lock(observer), message="the pass to wait for the image"
            )
            for delivery in await worker.read(1, block_ms=1):  # a task the pass put out first
                await worker.ack([delivery.entry_id])
            await queries.record_image_failed(hand, image_id, code="HTTP_ERROR", message="503")
            assert await queries.retry_failed_images(hand, request_id, owner="") is not None
        await asyncio.wait_for(feed, 30)

    await feeder.feed_once()
    delivered = await worker.read(10, block_ms=1)
    assert [d.task.image_id for d in delivered] == [image_id]


class XaddWaits(redis.asyncio.Redis):
    """A real Redis client whose pipelines that XADD wait until the test lets them go."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adding = asyncio.Event()
        self.go_on = asyncio.Event()

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = XaddWaitsPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.owner = self
        return pipe


class XaddWaitsPipeline(redis.asyncio.client.Pipeline):
    owner: XaddWaits  # whose events it waits on

    async def execute(self, raise_on_error: bool = True) -> Any:
        if any(args[0] == "XADD" for args, _ in self.command_stack):
            self.owner.adding.set()
            await self.owner.go_on.wait()
        return await super().execute(raise_on_error=raise_on_error)


async def test_a_release_recorded_after_its_image_was_retried_leaves_it_waiting(
    pool: asyncpg.Pool, redis_server_url: str, names: StreamNames, worker: TaskConsumer
) -> None:
    """The other order of the race above: the claim is made, and the worker's failure and the
    retry come before the XADD is answered. The record then finds the claim gone, records
    nothing (counted in imgpipe_releases_superseded_total), and the next pass releases the
    image again."""
    client = XaddWaits.from_url(redis_server_url)
    assert isinstance(client, XaddWaits)
    feeder = Feeder(pool=pool, redis=client, names=names, window=WINDOW, clock=passes_apart())
    request_id = await stored(pool, 1)
    (image_id,) = await image_ids(pool, request_id)
    superseded = REGISTRY.get_sample_value("imgpipe_releases_superseded_total") or 0.0
    try:
        feed = asyncio.create_task(feeder.feed_once())

        async def adding() -> bool:
            return client.adding.is_set()

        await wait_until_async(adding, message="the pass to XADD its release")
        async with pool.acquire() as conn:  # the claim is made: a worker fails the image
            await queries.record_image_failed(conn, image_id, code="HTTP_ERROR", message="503")
            assert await queries.retry_failed_images(conn, request_id, owner="") is not None
        client.go_on.set()
        assert (await asyncio.wait_for(feed, 30)).released == 1
        row = await pool.fetchrow(
            "SELECT enqueued_at, stream_entry_id FROM images WHERE id = $1", image_id
        )
        assert row is not None and tuple(row) == (None, None)  # waiting, not released
        assert REGISTRY.get_sample_value("imgpipe_releases_superseded_total") == superseded + 1

        assert (await feeder.feed_once()).released == 1
        delivered = await worker.read(10, block_ms=1)
        # The stale task of the first release, then the new one.
        assert [d.task.image_id for d in delivered] == [image_id, image_id]
        async with pool.acquire() as conn:
            (state,) = (await queries.image_states(conn, [image_id])).values()
        assert state.startable
    finally:
        client.go_on.set()
        await client.aclose()


async def test_a_release_the_stream_refused_goes_back_to_wait_for_the_next_pass(
    pool: asyncpg.Pool, names: StreamNames
) -> None:
    """Claimed and then not put on the stream (Redis did not answer): the images wait for the
    feeder's next pass, not for the reconciler to find them released with no task."""
    request_id = await stored(pool, 2)
    silent = redis.asyncio.Redis(host="127.0.0.1", port=free_tcp_port(), socket_timeout=2)
    async with pool.acquire() as conn:
        (release,) = await queries.next_waiting_images(conn, {request_id: 2})
        with pytest.raises(redis.exceptions.ConnectionError):
            await publish_releases(conn, silent, names, [release])
    await silent.aclose()
    rows = await pool.fetch(
        "SELECT enqueued_at, stream_entry_id FROM images WHERE request_id = $1", request_id
    )
    assert [tuple(r) for r in rows] == [(None, None), (None, None)]


async def test_a_deadlock_postgres_breaks_is_a_backend_error_that_is_retried(
    pool: asyncpg.Pool,
) -> None:
    """Whatever cycle is left, Postgres ends it by failing one statement: the service loops
    (the feeder's included) log it and try again, workers keep the task and retry it, and
    callers get UNAVAILABLE, as for any backend error, instead of the service stopping."""
    async with pool.acquire() as first, pool.acquire() as second:

        async def take(
            conn: queries.Connection, locks: tuple[int, int], held: asyncio.Event
        ) -> None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", locks[0])
                held.set()
                await both.wait()
                await conn.execute("SELECT pg_advisory_xact_lock($1)", locks[1])

        held = [asyncio.Event(), asyncio.Event()]
        both = asyncio.Event()
        runs = [
            asyncio.create_task(take(first, (1, 2), held[0])),
            asyncio.create_task(take(second, (2, 1), held[1])),
        ]
        await asyncio.wait_for(asyncio.gather(*(h.wait() for h in held)), 5)
        both.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 30)
    (broken,) = [o for o in outcomes if isinstance(o, BaseException)]
    assert isinstance(broken, asyncpg.exceptions.DeadlockDetectedError)
    assert isinstance(broken, BACKEND_ERRORS)


async def test_an_image_final_or_out_of_cooldown_or_busy_waits_is_not_deferred(
    pool: asyncpg.Pool, feeder: Feeder
) -> None:
    request_id = await stored(pool, 2)
    await feeder.feed_once()
    cooling, final = await image_ids(pool, request_id)

    assert [await defer(pool, cooling, 0, wait="cooldown", most=2) for _ in range(3)] == [
        True,
        True,
        False,  # two cooldown waits already: the next failure spends an attempt instead
    ]
    # Waits for a busy origin's connections are counted apart from the cooldowns.
    assert [await defer(pool, cooling, 0, wait="busy", most=1) for _ in range(2)] == [True, False]
    assert await defer(pool, cooling, 0)  # a retry's backoff is bounded by the attempts
    row = await pool.fetchrow(
        "SELECT cooldown_waits, busy_waits FROM images WHERE id = $1", cooling
    )
    assert row is not None and tuple(row) == (2, 1)
    async with pool.acquire() as conn:
        await queries.record_image_failed(conn, final, code="CANCELLED", message="cancelled")
        assert not await queries.defer_image(conn, final, 0)
        # A retry of the request starts the image's waits afresh.
        await queries.record_image_failed(conn, cooling, code="TIMEOUT", message="slow")
        await queries.retry_failed_images(conn, request_id, owner="")
    rows = await pool.fetch(
        "SELECT not_before, cooldown_waits, busy_waits FROM images WHERE request_id = $1",
        request_id,
    )
    assert {tuple(r) for r in rows} == {(None, 0, 0)}


def test_an_idle_pass_sleeps_until_the_next_deferred_image_is_due() -> None:
    assert FeedPass().sleep(0.1, 1.0) == 1.0
    assert FeedPass(due=0.25).sleep(0.1, 1.0) == pytest.approx(0.26)
    assert FeedPass(due=30).sleep(0.1, 1.0) == 1.0
    assert FeedPass(in_window=1, due=0.25).sleep(0.1, 1.0) == 0.1


async def test_an_idle_feeder_releases_a_deferred_image_when_it_is_due_without_a_wake(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames
) -> None:
    # An idle pause of a minute: only the deferred image's due time can end it in the test.
    feeder = Feeder(
        pool=pool, redis=redis_client, names=names, window=WINDOW, poll=0.01, idle_poll=60
    )
    request_id = await stored(pool, 1)
    await feeder.feed_once()
    (image_id,) = await image_ids(pool, request_id)
    assert await defer(pool, image_id, 0.5)
    stop = asyncio.Event()
    running = asyncio.create_task(feeder.run(stop))
    try:

        async def released_again() -> bool:
            return (await on_stream(redis_client, names))[str(request_id)] == 2

        await wait_until_async(released_again, timeout=10, message="released when due")
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=10)
