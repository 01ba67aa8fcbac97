"""Small client-side steps shared by the integration tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

import asyncpg
import redis.asyncio
from google.protobuf.message import Message

from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import task_pb2
from services.common.streams import TASK_FIELD, StreamNames
from tests.support import wait_until_async


def csv_of(rows: Sequence[tuple[str, str, Sequence[str]]]) -> bytes:
    lines = ["S. No.,Product Name,Input Image Urls"]
    lines += [f'{serial},{name},"{",".join(urls)}"' for serial, name, urls in rows]
    return ("\r\n".join(lines) + "\r\n").encode()


async def upload(
    stub: ingest_grpc.IngestServiceAsyncStub,
    body: bytes,
    *,
    idempotency_key: str = "",
    options: task_pb2.ImageOptions | None = None,
    webhook_url: str = "",
    chunk_size: int = 7,
    complete: bool = True,
    api_key: str = "",
) -> ingest_pb.Accepted:
    """UploadCsv with the body cut into small chunks, as a real stream would arrive."""

    async def messages() -> AsyncIterator[ingest_pb.UploadCsvRequest]:
        yield ingest_pb.UploadCsvRequest(
            header=ingest_pb.UploadHeader(
                options=options or task_pb2.ImageOptions(),
                webhook_url=webhook_url,
                idempotency_key=idempotency_key,
            )
        )
        for start in range(0, len(body), chunk_size):
            yield ingest_pb.UploadCsvRequest(chunk=body[start : start + chunk_size])
        if complete:
            yield ingest_pb.UploadCsvRequest(end=ingest_pb.UploadEnd(count=len(body)))

    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    response = await stub.UploadCsv(messages(), timeout=20, metadata=metadata)
    return response.accepted


async def image_rows(pool: asyncpg.Pool, request_id: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        """SELECT i.*, p.row_number FROM images i JOIN products p ON p.id = i.product_id
            WHERE i.request_id = $1 ORDER BY p.row_number, i.position""",
        uuid.UUID(request_id),
    )


M = TypeVar("M", bound=Message)


async def stream_messages(
    client: redis.asyncio.Redis, key: str, field: bytes, message_type: type[M]
) -> list[M]:
    """Every protobuf payload on a stream, oldest first."""
    entries: Any = await client.xrange(key)
    messages = []
    for _, fields in entries:
        message = message_type()
        message.ParseFromString(fields[field])
        messages.append(message)
    return messages


async def released_tasks(
    client: redis.asyncio.Redis, names: StreamNames, count: int
) -> list[task_pb2.ImageTask]:
    """The tasks on the stream once there are at least `count` (the feeder releases them after
    the upload's answer)."""

    async def enough() -> list[task_pb2.ImageTask] | None:
        tasks = await stream_messages(client, names.tasks, TASK_FIELD, task_pb2.ImageTask)
        return tasks if len(tasks) >= count else None

    return await wait_until_async(enough, timeout=10, message=f"{count} tasks on the stream")


async def released_rows(pool: asyncpg.Pool, request_id: str) -> list[asyncpg.Record]:
    """image_rows() once the feeder has released every image of the request to the stream (it
    marks the request published then)."""

    async def all_released() -> bool:
        published = await pool.fetchval(
            "SELECT published_at FROM requests WHERE id = $1", uuid.UUID(request_id)
        )
        return published is not None

    await wait_until_async(
        all_released, timeout=10, message=f"every image of {request_id} released"
    )
    return await image_rows(pool, request_id)


async def wait_final(pool: asyncpg.Pool, request_id: str) -> asyncpg.Record:
    """The request's row once it is Completed or Failed."""

    async def final() -> asyncpg.Record | None:
        row = await pool.fetchrow("SELECT * FROM requests WHERE id = $1", uuid.UUID(request_id))
        return row if row and row["status"] in ("Completed", "Failed") else None

    return await wait_until_async(final, timeout=30, message=f"request {request_id} final")
