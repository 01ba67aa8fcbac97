"""The worker against real Postgres, Redis, a file:// store and a local image origin."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import random
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import redis.asyncio
from PIL import Image
from prometheus_client import REGISTRY

from services.common import storage as keys
from services.common.db import lifecycle
from services.common.image_options import ImageOptions, to_proto
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import request_pb2, task_pb2
from services.common.storage import Storage
from services.common.streams import EVENT_FIELD, StreamNames, TaskConsumer, publish_tasks
from services.worker.budget import ByteBudget, PixelBudget
from services.worker.processor import Processor
from services.worker.runner import ConsumePolicy, consume
from testing import photos
from testing.databases import waits_for_a_lock
from testing.origin import ImageOrigin
from testing.polling import wait_until_async
from testing.uploads import csv_of, upload
from tests.integration.flows import image_rows, released_rows, stream_messages, wait_final

pytestmark = pytest.mark.integration


@pytest.fixture
async def running_worker(
    consumer: TaskConsumer, processor: Processor
) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(consume(consumer, processor, ConsumePolicy(concurrency=4), stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def finished_events(
    client: redis.asyncio.Redis, names: StreamNames
) -> list[request_pb2.RequestEvent]:
    return await stream_messages(client, names.events, EVENT_FIELD, request_pb2.RequestEvent)


async def test_request_runs_to_completed_with_outputs_csv_and_event(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    running_worker: asyncio.Event,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    storage: Storage,
    origin: ImageOrigin,
) -> None:
    good = [origin.url("/img/a.jpg"), origin.url("/img/b.jpg")]
    body = csv_of(
        [("1", "Shoe", good), ("2", "=cmd|' /C calc'!A0", [origin.url("/text"), good[0]])]
    )
    accepted = await upload(ingest_stub, body)

    request = await wait_final(pool, accepted.request_id)

    assert request["status"] == "Completed"
    assert (request["images_done"], request["images_failed"]) == (3, 1)
    assert request["completed_at"] is not None
    rows = await image_rows(pool, accepted.request_id)
    assert [r["status"] for r in rows] == ["Done", "Done", "Failed", "Done"]
    failed = rows[2]
    assert (failed["error_code"], failed["output_key"]) == ("NOT_AN_IMAGE", None)
    for row in (rows[0], rows[1], rows[3]):
        data = await storage.get(row["output_key"])
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.size == (640, 480)
        assert row["bytes_out"] == len(data) < row["bytes_in"]
    assert request["bytes_in"] == sum(r["bytes_in"] for r in rows if r["status"] == "Done")

    table = list(csv.reader(io.StringIO((await storage.get(request["output_csv_key"])).decode())))
    assert table[0][4:] == ["Errors", "SSIM"]
    assert table[1][3].split(",") == [await storage.public_url(r["output_key"]) for r in rows[:2]]
    assert table[2][1] == "'=cmd|' /C calc'!A0"  # formula injection neutralised
    assert table[2][3] == "," + await storage.public_url(rows[3]["output_key"])  # failed slot empty
    assert table[2][4] == f"{origin.url('/text')}: NOT_AN_IMAGE"
    # Every done image's measured quality, stored and written in slots like the URLs.
    done = [rows[0], rows[1], rows[3]]
    assert all(0.5 < r["ssim"] < 1 and r["quality"] == 50 and r["note"] is None for r in done)
    assert table[1][5] == ",".join(f"{r['ssim']:.4f}" for r in rows[:2])
    assert table[2][5] == f",{rows[3]['ssim']:.4f}"
    assert request["ssim_count"] == 3
    assert request["ssim_sum"] == pytest.approx(sum(r["ssim"] for r in done), abs=1e-5)

    [event] = [
        e for e in await finished_events(redis_client, names) if e.request_id == accepted.request_id
    ]
    assert event.type == request_pb2.REQUEST_EVENT_TYPE_FINISHED
    assert event.status == request_pb2.REQUEST_STATUS_COMPLETED
    assert (event.progress.images_done, event.progress.images_failed) == (3, 1)
    assert event.progress.mean_ssim == pytest.approx(request["ssim_sum"] / 3)
    assert event.output_csv_key == request["output_csv_key"]


async def test_effort_fast_records_no_ssim_and_the_request_has_no_mean(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    running_worker: asyncio.Event,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    storage: Storage,
    origin: ImageOrigin,
) -> None:
    # effort=fast skips the SSIM measurement (docs/performance.md): not a 0, not a mean of 0.
    urls = [origin.url("/img/a.jpg"), origin.url("/img/b.jpg")]
    options = task_pb2.ImageOptions(effort=task_pb2.EFFORT_FAST)

    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", urls)]), options=options)
    request = await wait_final(pool, accepted.request_id)

    assert (request["status"], request["images_done"]) == ("Completed", 2)
    rows = await image_rows(pool, accepted.request_id)
    assert [(r["ssim"], r["quality"]) for r in rows] == [(None, 50), (None, 50)]
    assert (request["ssim_count"], request["ssim_sum"]) == (0, 0)
    table = list(csv.reader(io.StringIO((await storage.get(request["output_csv_key"])).decode())))
    assert table[1][3].count(",") == 1 and table[1][5] == ","  # two outputs, two empty SSIMs
    [event] = [
        e for e in await finished_events(redis_client, names) if e.request_id == accepted.request_id
    ]
    assert not event.progress.HasField("mean_ssim")


async def test_a_size_target_is_met_or_noted_and_the_note_reaches_the_csv(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    running_worker: asyncio.Event,
    pool: asyncpg.Pool,
    storage: Storage,
    origin: ImageOrigin,
) -> None:
    # Noise saved at quality 20: nothing from quality 30 up is half its size.
    noise = Image.frombytes("RGB", (320, 240), random.Random(5).randbytes(320 * 240 * 3))
    origin.served["/img/noise.jpg"] = photos.jpeg(noise, 20)
    urls = [origin.url("/img/photo.jpg"), origin.url("/img/noise.jpg")]
    options = task_pb2.ImageOptions(target_ratio=0.5)

    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", urls)]), options=options)
    request = await wait_final(pool, accepted.request_id)

    assert request["status"] == "Completed"
    assert (request["images_done"], request["images_failed"]) == (2, 0)  # a note, no failure
    met, missed = await image_rows(pool, accepted.request_id)
    assert met["bytes_out"] <= met["bytes_in"] / 2
    assert met["note"] is None
    assert 30 <= met["quality"] <= 95
    assert missed["note"] == "TARGET_NOT_MET"
    assert missed["bytes_out"] > missed["bytes_in"] / 2
    table = list(csv.reader(io.StringIO((await storage.get(request["output_csv_key"])).decode())))
    assert table[1][4] == f"{urls[1]}: TARGET_NOT_MET"
    assert len(table[1][5].split(",")) == 2


async def test_all_failed_is_failed(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    running_worker: asyncio.Event,
    pool: asyncpg.Pool,
    origin: ImageOrigin,
) -> None:
    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", [origin.url("/missing")])]))
    request = await wait_final(pool, accepted.request_id)
    assert request["status"] == "Failed"
    [row] = await image_rows(pool, accepted.request_id)
    assert row["error_code"] == "HTTP_STATUS" and "404" in row["error_message"]


async def test_duplicate_deliveries_count_once_and_finish_once(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    consumer: TaskConsumer,
    processor: Processor,
    origin: ImageOrigin,
) -> None:
    urls = [origin.url(f"/img/dup{i}.jpg") for i in range(3)]
    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", urls)]))
    rows = await released_rows(pool, accepted.request_id)
    # Every task on the stream a second time, as a republish of a release whose entries were
    # not recorded leaves them.
    duplicates = [
        task_pb2.ImageTask(
            request_id=accepted.request_id,
            image_id=r["id"],
            input_url=r["input_url"],
            options=to_proto(ImageOptions()),
        )
        for r in rows
    ]
    await publish_tasks(redis_client, names, duplicates)
    assert await redis_client.xlen(names.tasks) == 6

    stop = asyncio.Event()
    # Two consumers race over the same entries.
    other = TaskConsumer(redis_client, names, "other-consumer")
    workers = [
        asyncio.create_task(consume(c, processor, ConsumePolicy(concurrency=3), stop))
        for c in (consumer, other)
    ]
    try:
        request = await wait_final(pool, accepted.request_id)

        async def all_acked() -> bool:
            summary = await redis_client.xpending(names.tasks, "workers")
            return bool(summary["pending"] == 0)

        await wait_until_async(all_acked, timeout=10, message="every entry acknowledged")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=10)

    assert (request["images_done"], request["images_failed"], request["images_total"]) == (3, 0, 3)
    events = [
        e for e in await finished_events(redis_client, names) if e.request_id == accepted.request_id
    ]
    assert len(events) == 1


async def test_consumer_rereads_its_own_pending_entries_first(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
) -> None:
    accepted = await upload(
        ingest_stub, csv_of([("1", "Shoe", ["http://a.example/1.jpg", "http://a.example/2.jpg"])])
    )
    await released_rows(pool, accepted.request_id)
    first = TaskConsumer(redis_client, names, "restarting")
    await first.ensure_group()
    taken = await first.read(count=1, block_ms=100)  # delivered, then the process "dies"

    restarted = TaskConsumer(redis_client, names, "restarting")
    again = await restarted.read(count=10, block_ms=100)
    fresh = await restarted.read(count=10, block_ms=100)

    assert [d.entry_id for d in again] == [d.entry_id for d in taken]
    assert len(fresh) == 1 and fresh[0].entry_id != taken[0].entry_id


class CountingPixels(PixelBudget):
    """A pixel budget that remembers how many images it ever let work at once."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.holders = 0
        self.most_holders = 0
        self.reserved: list[int] = []

    @contextlib.contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        with super().reserve(pixels):
            with self._changed:
                self.holders += 1
                self.most_holders = max(self.most_holders, self.holders)
                self.reserved.append(pixels)
            try:
                yield
            finally:
                with self._changed:
                    self.holders -= 1


@pytest.mark.parametrize("framing", ["img", "chunked"])  # with Content-Length, and without
async def test_budgets_smaller_than_one_image_still_finish_every_image_one_at_a_time(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    running_worker: asyncio.Event,
    processor: Processor,
    pool: asyncpg.Pool,
    origin: ImageOrigin,
    framing: str,
) -> None:
    # Each image is larger than both budgets, so each runs alone, and none waits forever: a
    # chunked body reserves as it arrives, and waits to grow while it holds its first step.
    processor.buffers = ByteBudget(1)
    processor.pixels = pixels = CountingPixels(1)
    urls = [origin.url(f"/{framing}/{name}.jpg") for name in "abcdef"]
    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", urls[:3]), ("2", "Hat", urls[3:])]))

    request = await wait_final(pool, accepted.request_id)

    assert (request["status"], request["images_done"]) == ("Completed", 6)
    assert pixels.most_holders == 1 and pixels.reserved == [640 * 480] * 6
    assert (processor.buffers.used, pixels.used) == (0, 0)  # every lease given back


async def test_an_output_that_lands_while_its_request_is_deleted_is_removed_by_its_writer(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    running_worker: asyncio.Event,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    storage: Storage,
    origin: ImageOrigin,
) -> None:
    held = "/img/held.jpg"
    origin.gates[held] = release = asyncio.Event()
    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", [origin.url(held)])]))
    request_id = uuid.UUID(accepted.request_id)

    async def fetching() -> bool:
        return origin.hits_of(held) > 0

    await wait_until_async(fetching, timeout=30, message="the held image requested")
    # While the image is in flight, the request is cancelled and a delete starts; say its
    # listing of the store has run (it found nothing yet) and its row delete has not.
    async with pool.acquire() as conn:
        cancelled = await lifecycle.cancel_request(
            conn, request_id, "", output_csv_key=keys.output_csv_key(request_id)
        )
        assert isinstance(cancelled, lifecycle.Cancelled)
        assert await lifecycle.mark_deleting(conn, request_id)
    [image] = await image_rows(pool, accepted.request_id)
    release.set()

    async def acknowledged() -> bool:
        return bool((await redis_client.xpending(names.tasks, "workers"))["pending"] == 0)

    await wait_until_async(acknowledged, timeout=30, message="the held image's task finished")
    # The worker wrote its output, could not record it, and removed it: the delete will not
    # list the store again, so nothing else would.
    assert await storage.missing(keys.image_key(request_id, image["id"], "jpg"))


def _record_batches() -> tuple[float, float]:
    """How many batches of Done records this process ran, and how many records they held."""
    labels = {"batch": "record"}
    count = REGISTRY.get_sample_value("imgpipe_worker_batch_size_count", labels) or 0.0
    total = REGISTRY.get_sample_value("imgpipe_worker_batch_size_sum", labels) or 0.0
    return count, total


async def test_a_busy_worker_records_its_images_in_shared_statements(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    processor: Processor,
    consumer: TaskConsumer,
    pool: asyncpg.Pool,
    origin: ImageOrigin,
) -> None:
    # A linger no test waits out: a batch runs when no other image of the worker is in work.
    lingering = Processor(
        pool=processor.pool,
        redis=processor.redis,
        names=processor.names,
        storage=processor.storage,
        fetch=processor.fetch,
        executor=processor.executor,
        image_limits=processor.image_limits,
        retry=processor.retry,
        record_linger=30.0,
    )
    count_before, total_before = _record_batches()
    stop = asyncio.Event()
    worker = asyncio.create_task(consume(consumer, lingering, ConsumePolicy(concurrency=8), stop))
    try:
        urls = [origin.url(f"/img/batch-{n}.jpg") for n in range(6)]
        accepted = await upload(ingest_stub, csv_of([("1", "Shoe", urls)]))
        request = await wait_final(pool, accepted.request_id)
    finally:
        stop.set()
        await asyncio.wait_for(worker, timeout=10)
    count, total = _record_batches()
    assert (request["status"], request["images_done"]) == ("Completed", 6)
    assert total - total_before == 6  # every record went through a batch
    assert count - count_before < 6  # and some shared one statement


@pytest.mark.parametrize(
    ("images", "found", "final"),
    [(1, True, ("Completed", 1, 0)), (3, False, ("Failed", 0, 3))],
    ids=["done", "failed"],
)
async def test_a_request_whose_row_is_held_holds_up_no_other_requests_records(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    running_worker: asyncio.Event,
    pool: asyncpg.Pool,
    origin: ImageOrigin,
    images: int,
    found: bool,
    final: tuple[str, int, int],
) -> None:
    """A retry of a big request holds its row for seconds (docs/lifecycle.md), and a worker's
    record of one of its images, Done or failed, waits for it. Another request's records on
    that worker do not: each request's records batch apart, on their own connection, and the
    held request's wait on one however many of its images end (three failures, one
    connection each, took the pool of 4 here, 2 of them the test's, and the next upload found
    none)."""
    gate = asyncio.Event()
    paths = [f"/img/row-held-{n}.jpg" for n in range(images)]
    for path in paths:
        origin.gates[path] = gate
        if not found:
            origin.missing.add(path)
    busy = await upload(ingest_stub, csv_of([("1", "Shoe", [origin.url(p) for p in paths])]))

    async def fetching() -> bool:
        return all(origin.hits_of(path) for path in paths)

    await wait_until_async(fetching, timeout=30, message="the held images requested")
    async with pool.acquire() as holder, pool.acquire() as observer:
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM requests WHERE id = $1 FOR UPDATE", uuid.UUID(busy.request_id)
            )
            gate.set()
            await wait_until_async(
                lambda: waits_for_a_lock(observer),
                timeout=30,
                message="the held request's records to queue for its row",
            )
            other = await upload(ingest_stub, csv_of([("1", "Hat", [origin.url("/img/o.jpg")])]))
            request = await wait_final(pool, other.request_id)
            assert (request["status"], request["images_done"]) == ("Completed", 1)
            waiting = await observer.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            assert waiting == 1  # the held request's records, on one connection
        request = await wait_final(pool, busy.request_id)
    assert (request["status"], request["images_done"], request["images_failed"]) == final


async def test_a_freed_slot_takes_the_next_task_without_waiting_for_a_quarter(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    processor: Processor,
    consumer: TaskConsumer,
    pool: asyncpg.Pool,
    origin: ImageOrigin,
) -> None:
    """A worker reads when a quarter of its slots are free, or soon after one is: tasks that
    hold their slots for long (24 MP photos; here, held at the origin) free a quarter rarely,
    and the stream's next task, a newcomer's, waited for that."""
    gate = asyncio.Event()
    held = [f"/img/held-{n}.jpg" for n in range(7)]
    for path in held:
        origin.gates[path] = gate
    origin.missing.add("/img/gone.jpg")
    stop = asyncio.Event()
    worker = asyncio.create_task(consume(consumer, processor, ConsumePolicy(concurrency=8), stop))
    try:
        urls = [origin.url(path) for path in [*held, "/img/gone.jpg"]]
        slow = await upload(ingest_stub, csv_of([("1", "Shoe", urls)]))

        async def one_slot_free() -> bool:  # the 404 failed, the other seven wait at the origin
            rows = await image_rows(pool, slow.request_id)
            return sum(r["status"] == "Failed" for r in rows) == 1 and all(
                origin.hits_of(origin.url(path)) for path in held
            )

        await wait_until_async(one_slot_free, timeout=30, message="seven slots held, one free")

        quick = await upload(ingest_stub, csv_of([("1", "Hat", [origin.url("/img/quick.jpg")])]))
        request = await wait_final(pool, quick.request_id)
        assert request["status"] == "Completed"
        # It took the one free slot while the seven still waited in theirs, each at its first
        # request: a quarter of the slots (2) was never free.
        rows = await image_rows(pool, slow.request_id)
        assert sorted(r["status"] for r in rows) == ["Failed"] + ["Pending"] * 7
        assert [origin.hits_of(origin.url(path)) for path in held] == [1] * 7
    finally:
        gate.set()
        stop.set()
        await asyncio.wait_for(worker, timeout=10)
