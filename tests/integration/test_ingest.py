"""IngestService against real Postgres and Redis: accepted whole or rejected whole."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
import redis.asyncio

from services.common.errors import Conflict, InvalidArgument, InvalidCsv, error_from_rpc
from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import request_pb2, task_pb2
from services.common.streams import StreamNames
from testing.uploads import csv_of, upload
from tests.integration.flows import image_rows, released_tasks

pytestmark = pytest.mark.integration

URLS = ["http://img.example/a.jpg", "http://img.example/b.jpg"]


async def test_upload_stores_products_and_publishes_one_task_per_distinct_url(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
) -> None:
    body = csv_of([("1", "Shoe", URLS), ("2", "Bag", URLS[:1]), ("3", "Hat", URLS)])
    options = task_pb2.ImageOptions(quality=70, format=task_pb2.OUTPUT_FORMAT_WEBP)

    accepted = await upload(ingest_stub, body, options=options)

    assert (accepted.products, accepted.images, accepted.created) == (3, 5, True)
    assert accepted.status == request_pb2.REQUEST_STATUS_PENDING
    request = await pool.fetchrow(
        "SELECT * FROM requests WHERE id = $1", uuid.UUID(accepted.request_id)
    )
    assert request is not None
    assert request["images_total"] == 5 and request["products_total"] == 3
    rows = await image_rows(pool, accepted.request_id)
    assert [(r["row_number"], r["position"], r["input_url"]) for r in rows] == [
        (2, 0, URLS[0]),
        (2, 1, URLS[1]),
        (3, 0, URLS[0]),
        (4, 0, URLS[0]),
        (4, 1, URLS[1]),
    ]
    # A URL repeated in the request is one task: its later images follow the first one's.
    leaders = {r["input_url"]: r["id"] for r in reversed(rows)}
    assert [r["leader_id"] for r in rows] == [
        None,
        None,
        rows[0]["id"],
        rows[0]["id"],
        rows[1]["id"],
    ]
    tasks = await released_tasks(redis_client, names, 2)
    assert sorted(t.image_id for t in tasks) == sorted(leaders.values())
    assert {t.request_id for t in tasks} == {accepted.request_id}
    assert all(
        t.options.quality == 70 and t.options.format == task_pb2.OUTPUT_FORMAT_WEBP for t in tasks
    )


async def test_invalid_csv_is_rejected_whole_with_every_problem(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
) -> None:
    body = csv_of(
        [
            ("1", "Shoe", URLS),
            ("", "Bag", URLS),
            ("3", "Hat", ["ftp://x/y.jpg"]),
            ("1", "Dup", URLS),
        ]
    )
    before = await pool.fetchval("SELECT count(*) FROM requests")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(ingest_stub, body)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = error_from_rpc(caught.value)
    assert isinstance(error, InvalidCsv)
    found = {(d.row, d.column) for d in error.details}
    assert found == {(3, "S. No."), (4, "Input Image Urls"), (5, "S. No.")}
    assert await pool.fetchval("SELECT count(*) FROM requests") == before
    assert await redis_client.exists(names.tasks) == 0


async def test_duplicate_serials_are_found_in_postgres_in_row_order(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub, pool: asyncpg.Pool
) -> None:
    body = csv_of(
        [
            ("7", "Shirt", URLS),
            ("8", "Hat", URLS),
            (" 7 ", "Cap", URLS),
            ("8", "Bag", URLS),
            ("07", "Sock", URLS),  # not the same serial number as 7
        ]
    )
    before = await pool.fetchval("SELECT count(*) FROM products")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(ingest_stub, body)

    error = error_from_rpc(caught.value)
    assert error.message == "the CSV has 2 problem(s)"
    assert [(d.row, d.column, d.message) for d in error.details] == [
        (4, "S. No.", "duplicate serial number '7' (first seen in row 2)"),
        (5, "S. No.", "duplicate serial number '8' (first seen in row 3)"),
    ]
    assert await pool.fetchval("SELECT count(*) FROM products") == before  # rolled back


async def test_missing_columns_and_empty_file(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(ingest_stub, b"S. No.,Name\r\n1,Shoe\r\n")
    error = error_from_rpc(caught.value)
    assert {(d.row, d.column) for d in error.details} == {
        (1, "Product Name"),
        (1, "Input Image Urls"),
    }

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(ingest_stub, b"")
    assert [(d.row, d.message) for d in error_from_rpc(caught.value).details] == [
        (1, "the file is empty")
    ]


async def test_row_limit_is_a_csv_problem(ingest_stub: ingest_grpc.IngestServiceAsyncStub) -> None:
    body = csv_of([(str(i), f"P{i}", URLS[:1]) for i in range(60)])  # the stub allows 50 rows
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(ingest_stub, body, chunk_size=4096)
    [detail] = error_from_rpc(caught.value).details
    assert detail.row == 52 and "50" in detail.message


async def test_bad_options_and_webhook_are_invalid_argument(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
) -> None:
    body = csv_of([("1", "Shoe", URLS)])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(
            ingest_stub, body, options=task_pb2.ImageOptions(quality=120), webhook_url="ftp://h/x"
        )
    error = error_from_rpc(caught.value)
    assert isinstance(error, InvalidArgument)
    assert {d.column for d in error.details} == {"options", "webhook_url"}


async def test_idempotency_key_replays_same_bytes_and_refuses_others(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub, pool: asyncpg.Pool
) -> None:
    key = f"key-{uuid.uuid4()}"
    body = csv_of([("1", "Shoe", URLS)])
    first = await upload(ingest_stub, body, idempotency_key=key)
    again = await upload(ingest_stub, body, idempotency_key=key, chunk_size=3)

    assert again.request_id == first.request_id
    assert (first.created, again.created) == (True, False)
    assert (again.products, again.images) == (1, 2)
    count = await pool.fetchval("SELECT count(*) FROM requests WHERE idempotency_key = $1", key)
    assert count == 1

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(ingest_stub, csv_of([("1", "Other", URLS)]), idempotency_key=key)
    assert isinstance(error_from_rpc(caught.value), Conflict)


async def test_submit_products_shares_the_csv_rules(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub, pool: asyncpg.Pool
) -> None:
    async def messages(
        products: list[ingest_pb.ProductInput],
    ) -> AsyncIterator[ingest_pb.SubmitProductsRequest]:
        yield ingest_pb.SubmitProductsRequest(header=ingest_pb.UploadHeader())
        for product in products:
            yield ingest_pb.SubmitProductsRequest(product=product)
        yield ingest_pb.SubmitProductsRequest(end=ingest_pb.UploadEnd(count=len(products)))

    good = [
        ingest_pb.ProductInput(
            serial_number="A-1", product_name='Shoe, "red"', input_image_urls=URLS
        ),
        ingest_pb.ProductInput(serial_number="A-2", product_name="Bag", input_image_urls=URLS[:1]),
    ]
    response = await ingest_stub.SubmitProducts(messages(good), timeout=10)
    assert (response.accepted.products, response.accepted.images) == (2, 3)
    names = await pool.fetch(
        "SELECT product_name FROM products WHERE request_id = $1 ORDER BY row_number",
        uuid.UUID(response.accepted.request_id),
    )
    assert [r["product_name"] for r in names] == ['Shoe, "red"', "Bag"]

    bad = [ingest_pb.ProductInput(serial_number="A-1", product_name="Shoe", input_image_urls=[])]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest_stub.SubmitProducts(messages(bad), timeout=10)
    [detail] = error_from_rpc(caught.value).details
    assert (detail.row, detail.column) == (2, "Input Image Urls")


async def test_first_message_must_be_the_header(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
) -> None:
    async def messages() -> AsyncIterator[ingest_pb.UploadCsvRequest]:
        yield ingest_pb.UploadCsvRequest(chunk=b"S. No.,Product Name,Input Image Urls\r\n")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest_stub.UploadCsv(messages(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_stream_cut_short_is_never_stored(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub, pool: asyncpg.Pool
) -> None:
    """A client that stops mid-file looks to the servicer like a file that ended: the
    UploadEnd message (and its byte count) is what tells the two apart."""
    body = csv_of([("1", "Shoe", URLS), ("2", "Bag", URLS)])
    cut = body[: body.index(b"2,Bag")]  # a valid CSV on its own
    before = await pool.fetchval("SELECT count(*) FROM requests")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(ingest_stub, cut, complete=False)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UploadEnd" in error_from_rpc(caught.value).message

    async def lying_end() -> AsyncIterator[ingest_pb.UploadCsvRequest]:
        yield ingest_pb.UploadCsvRequest(header=ingest_pb.UploadHeader())
        yield ingest_pb.UploadCsvRequest(chunk=cut)
        yield ingest_pb.UploadCsvRequest(end=ingest_pb.UploadEnd(count=len(body)))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest_stub.UploadCsv(lying_end(), timeout=10)
    assert "incomplete" in error_from_rpc(caught.value).message
    assert await pool.fetchval("SELECT count(*) FROM requests") == before


async def test_two_identical_uploads_at_once_make_one_request(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub, pool: asyncpg.Pool
) -> None:
    key = f"key-{uuid.uuid4()}"
    body = csv_of([(str(i), f"P{i}", URLS) for i in range(40)])
    answers = await asyncio.gather(
        *(upload(ingest_stub, body, idempotency_key=key, chunk_size=64) for _ in range(4))
    )
    assert len({a.request_id for a in answers}) == 1
    assert sorted(a.created for a in answers) == [False, False, False, True]
    count = await pool.fetchval("SELECT count(*) FROM requests WHERE idempotency_key = $1", key)
    assert count == 1
