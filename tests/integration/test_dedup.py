"""No repeated work (issue 19): a URL repeated in a request is fetched and compressed once, an
owner's earlier output of the same source and options is copied, and the counters stay exact,
with two workers taking tasks from the same stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
import redis.asyncio

from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.storage import Storage
from services.common.streams import StreamNames, TaskConsumer
from services.worker.processor import Processor
from services.worker.runner import ConsumePolicy, consume
from testing.origin import ImageOrigin
from testing.polling import wait_until_async
from testing.uploads import csv_of, upload
from tests.integration.flows import image_rows, wait_final

pytestmark = pytest.mark.integration


@pytest.fixture
async def two_workers(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    processor: Processor,
    consumer: TaskConsumer,
) -> AsyncIterator[None]:
    """Two workers (a processor and a consumer each) reading the same task stream."""
    second = Processor(
        pool=pool,
        redis=redis_client,
        names=names,
        storage=processor.storage,
        fetch=processor.fetch,
        executor=processor.executor,
        image_limits=processor.image_limits,
        retry=processor.retry,
    )
    workers = [(consumer, processor), (TaskConsumer(redis_client, names, "second"), second)]
    stop = asyncio.Event()
    running = [
        asyncio.create_task(consume(c, p, ConsumePolicy(concurrency=4), stop)) for c, p in workers
    ]
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), timeout=10)


@dataclass
class Dedup:
    """Ingest, two workers on one stream, the pool, the store and the origin of a dedup test."""

    stub: ingest_grpc.IngestServiceAsyncStub
    pool: asyncpg.Pool
    storage: Storage
    origin: ImageOrigin

    async def finished(self, body: bytes) -> tuple[str, asyncpg.Record, list[asyncpg.Record]]:
        """Upload `body`; once the request is final, its id, its row and its image rows."""
        accepted = await upload(self.stub, body)
        request = await wait_final(self.pool, accepted.request_id)
        return accepted.request_id, request, await image_rows(self.pool, accepted.request_id)


@pytest.fixture
def dedup(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    two_workers: None,
    pool: asyncpg.Pool,
    storage: Storage,
    origin: ImageOrigin,
) -> Dedup:
    return Dedup(ingest_stub, pool, storage, origin)


def assert_counters_exact(request: asyncpg.Record, rows: list[asyncpg.Record]) -> None:
    """The request's counters are the sums over its image rows."""
    done = [r for r in rows if r["status"] == "Done"]
    assert request["images_total"] == len(rows)
    assert request["images_done"] == len(done)
    assert request["images_failed"] == sum(r["status"] == "Failed" for r in rows)
    assert request["bytes_in"] == sum(r["bytes_in"] for r in done)
    assert request["bytes_out"] == sum(r["bytes_out"] for r in done)
    assert request["ssim_count"] == len(done)
    assert request["ssim_sum"] == pytest.approx(sum(r["ssim"] for r in done), abs=1e-4)


async def test_a_url_repeated_in_a_request_is_fetched_once_and_every_row_gets_its_outcome(
    dedup: Dedup,
) -> None:
    origin, pool = dedup.origin, dedup.pool
    brand, gone = origin.url("/img/brand.jpg"), origin.url("/img/gone.jpg")
    origin.missing.add("/img/gone.jpg")
    own = [origin.url(f"/img/own{i}.jpg") for i in range(3)]
    body = csv_of(
        [
            ("1", "Shoe", [brand, own[0], gone]),
            ("2", "Hat", [own[1], brand]),
            ("3", "Sock", [brand, gone, own[2], brand]),
        ]
    )
    request_id, request, rows = await dedup.finished(body)

    assert origin.hits_of(brand) == 1 and origin.hits_of(gone) == 1
    assert all(origin.hits_of(url) == 1 for url in own)
    assert_counters_exact(request, rows)
    assert (request["status"], request["images_done"], request["images_failed"]) == (
        "Completed",
        7,
        2,
    )
    leader, *followers = [r for r in rows if r["input_url"] == brand]
    assert len(followers) == 3 and leader["leader_id"] is None
    for follower in followers:
        assert follower["leader_id"] == leader["id"]
        assert follower["stream_entry_id"] is None  # never released: the leader's work is theirs
        assert follower["status"] == "Done"
        for column in ("output_key", "bytes_in", "bytes_out", "ssim", "quality", "width"):
            assert follower[column] == leader[column]
    assert await dedup.storage.get(leader["output_key"])  # one object, named by every row
    failed = [r for r in rows if r["input_url"] == gone]
    assert [(r["status"], r["error_code"]) for r in failed] == [("Failed", "HTTP_STATUS")] * 2

    # A retry puts the leader and its follower back; only the leader is fetched again.
    origin.missing.clear()
    response = await dedup.stub.RetryFailedImages(
        ingest_pb.RetryFailedImagesRequest(request_id=request_id), timeout=5
    )
    assert response.images_retried == 2

    async def done_again() -> asyncpg.Record | None:
        row = await pool.fetchrow("SELECT * FROM requests WHERE id = $1", uuid.UUID(request_id))
        return row if row and row["status"] == "Completed" and row["images_done"] == 9 else None

    request = await wait_until_async(done_again, timeout=30, message="finished again")
    assert origin.hits_of(gone) == 2
    rows = await image_rows(pool, request_id)
    assert_counters_exact(request, rows)
    assert all(r["status"] == "Done" for r in rows)


async def test_the_same_url_in_two_requests_is_compressed_once_then_copied(
    dedup: Dedup,
) -> None:
    origin, pool, storage = dedup.origin, dedup.pool, dedup.storage
    shared = origin.url("/img/shared.jpg")
    first, _, [original, follower] = await dedup.finished(csv_of([("1", "Shoe", [shared] * 2)]))
    assert original["reused_from"] is None and follower["leader_id"] == original["id"]

    # Two more requests at once, each repeating the URL: taken by both workers concurrently.
    later = await asyncio.gather(
        *(dedup.finished(csv_of([("1", "Hat", [shared, shared])])) for _ in range(2))
    )
    for request_id, request, rows in later:
        assert request["status"] == "Completed"
        assert_counters_exact(request, rows)
        leader, copy = rows
        # The source is fetched (its bytes are the key) but not compressed: the stored output
        # is copied under this request's own key, so deleting the first request keeps it.
        assert leader["reused_from"] is not None
        assert leader["output_key"].startswith(f"requests/{request_id}/")
        assert copy["output_key"] == leader["output_key"] and copy["status"] == "Done"
        assert await storage.get(leader["output_key"]) == await storage.get(original["output_key"])
        assert (leader["bytes_out"], leader["ssim"], leader["quality"]) == (
            original["bytes_out"],
            original["ssim"],
            original["quality"],
        )
    assert origin.hits_of(shared) == 3  # once per request, never per row

    # Deleting a request deletes what it remembered (the newest copy is what is remembered).
    await pool.execute("DELETE FROM requests WHERE id = $1", uuid.UUID(first))
    remembered = await pool.fetch("SELECT request_id FROM reusable_outputs")
    assert uuid.UUID(first) not in {r["request_id"] for r in remembered}


async def test_a_stored_output_that_is_gone_or_another_owners_is_compressed_again(
    dedup: Dedup,
) -> None:
    url = dedup.origin.url("/img/kept.jpg")
    _, _, [original] = await dedup.finished(csv_of([("1", "Shoe", [url])]))
    root = dedup.storage.local_root
    assert root is not None
    (root / original["output_key"]).unlink()  # expired or deleted from the store

    _, request, [again] = await dedup.finished(csv_of([("1", "Shoe", [url])]))
    assert request["status"] == "Completed" and again["status"] == "Done"
    assert again["reused_from"] is None  # compressed, and remembered in place of the lost one
    assert await dedup.storage.get(again["output_key"])

    # An output remembered for another owner is not theirs to reuse.
    await dedup.pool.execute("UPDATE reusable_outputs SET owner = 'someone else' WHERE owner = ''")
    _, _, [own] = await dedup.finished(csv_of([("1", "Shoe", [url])]))
    assert own["status"] == "Done" and own["reused_from"] is None
