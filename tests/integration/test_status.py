"""StatusService against real Postgres: the request, paging in CSV order, NOT_FOUND."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio

from services.common.errors import InvalidArgument, NotFound, error_from_rpc
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.common.streams import TaskConsumer
from services.status.progress import ProgressHub
from services.worker.processor import Processor
from services.worker.runner import ConsumePolicy, consume
from testing.origin import ImageOrigin
from testing.uploads import csv_of, upload

pytestmark = pytest.mark.integration


async def test_get_request_and_pages_in_csv_order(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    status_stub: status_grpc.StatusServiceAsyncStub,
    pool: asyncpg.Pool,
) -> None:
    # Serial numbers deliberately out of order and repeated names: order is the CSV's.
    rows = [
        (str(100 - i), "Same name", [f"http://h.example/{i}/{j}.jpg" for j in range(i % 3 + 1)])
        for i in range(7)
    ]
    accepted = await upload(ingest_stub, csv_of(rows), chunk_size=64)
    request_id = accepted.request_id
    # Row 3's two images: one done, one failed, to see both in the answer.
    first_two = await pool.fetch(
        """SELECT i.id FROM images i JOIN products p ON p.id = i.product_id
            WHERE i.request_id = $1 AND p.row_number = 3 ORDER BY i.position""",
        uuid.UUID(request_id),
    )
    await pool.execute(
        "UPDATE images SET status='Done', output_key='requests/x/1.jpg' WHERE id = $1",
        first_two[0]["id"],
    )
    await pool.execute(
        """UPDATE images SET status = 'Failed', error_code = 'TIMEOUT', error_message = 'slow'
            WHERE id = $1""",
        first_two[1]["id"],
    )

    got = (
        await status_stub.GetRequest(status_pb.GetRequestRequest(request_id=request_id), timeout=5)
    ).request
    assert got.request_id == request_id
    assert got.status == request_pb2.REQUEST_STATUS_PENDING
    assert (got.progress.images_total, got.products_total) == (accepted.images, 7)
    assert not got.HasField("completed_at")

    seen: list[request_pb2.Product] = []
    token, pages = "", 0
    while True:
        page = await status_stub.ListProducts(
            status_pb.ListProductsRequest(request_id=request_id, page_size=3, page_token=token),
            timeout=5,
        )
        seen.extend(page.products)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert [p.serial_number for p in seen] == [r[0] for r in rows]
    assert [p.row_number for p in seen] == list(range(2, 9))
    assert [list(p.input_image_urls) for p in seen] == [r[2] for r in rows]
    first = seen[1]  # row 3 has two images: Done then Failed
    assert list(first.output_image_urls) == ["http://127.0.0.1:8080/files/requests/x/1.jpg", ""]
    assert [(e.url, e.code, e.message) for e in first.errors] == [
        (rows[1][2][1], "TIMEOUT", "slow")
    ]


async def test_unknown_and_malformed_ids_are_not_found(
    status_stub: status_grpc.StatusServiceAsyncStub,
) -> None:
    for request_id in (str(uuid.uuid4()), "not-a-uuid"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await status_stub.GetRequest(
                status_pb.GetRequestRequest(request_id=request_id), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert isinstance(error_from_rpc(caught.value), NotFound)


async def test_bad_page_arguments(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub, status_stub: status_grpc.StatusServiceAsyncStub
) -> None:
    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", ["http://h.example/a.jpg"])]))
    for request in (
        status_pb.ListProductsRequest(request_id=accepted.request_id, page_size=1001),
        status_pb.ListProductsRequest(request_id=accepted.request_id, page_token="garbage!"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await status_stub.ListProducts(request, timeout=5)
        assert isinstance(error_from_rpc(caught.value), InvalidArgument)


async def _subscriptions(redis_client: redis.asyncio.Redis, prefix: str) -> tuple[int, int]:
    """Patterns on the whole server, and channels under this run's prefix."""
    patterns = int(await redis_client.execute_command("PUBSUB", "NUMPAT"))  # type: ignore[no-untyped-call]
    return patterns, len(await redis_client.pubsub_channels(f"{prefix}*"))


async def test_many_watchers_see_progress_to_the_end_through_one_subscription(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    status_stub: status_grpc.StatusServiceAsyncStub,
    consumer: TaskConsumer,
    processor: Processor,
    redis_client: redis.asyncio.Redis,
    hub: ProgressHub,
    origin: ImageOrigin,
) -> None:
    urls = [origin.url(f"/img/watch{i}.jpg") for i in range(6)]
    accepted = await upload(ingest_stub, csv_of([("1", "Shoe", urls)]))
    # The hub holds one pattern subscription from its start; 20 watchers must add none.
    # (NUMPAT counts every client's patterns on a server other runs may share: compare.)
    assert hub.connected.is_set()
    before = await _subscriptions(redis_client, hub.names.prefix)
    calls = [
        status_stub.WatchRequest(
            status_pb.WatchRequestRequest(request_id=accepted.request_id), timeout=30
        )
        for _ in range(20)
    ]
    firsts = [await anext(aiter(call)) for call in calls]  # every watcher is subscribed now
    assert {f.request.status for f in firsts} == {request_pb2.REQUEST_STATUS_PENDING}
    assert hub.watchers == 20
    assert await _subscriptions(redis_client, hub.names.prefix) == before

    stop = asyncio.Event()
    worker = asyncio.create_task(consume(consumer, processor, ConsumePolicy(concurrency=2), stop))
    try:
        streams = await asyncio.gather(*(_rest(call) for call in calls))
    finally:
        stop.set()
        await asyncio.wait_for(worker, timeout=10)

    for updates in streams:
        done = [u.progress.images_done for u in updates]
        assert done == sorted(done)  # never goes backwards
        last = updates[-1]
        assert last.status == request_pb2.REQUEST_STATUS_COMPLETED
        assert last.progress.images_done == 6 and last.progress.percent == 100
        assert last.HasField("completed_at") and last.output_csv_key
        assert not last.progress.HasField("eta_seconds")
    assert any(len(updates) > 2 for updates in streams)  # intermediate progress arrived
    assert hub.watchers == 0


async def _rest(call: Any) -> list[request_pb2.Request]:
    return [message.request async for message in call]
