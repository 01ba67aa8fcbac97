"""Small client-side steps shared by the integration tests."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

import asyncpg
import redis.asyncio
from google.protobuf.message import Message

from services.common.pb.imgpipe.v1 import task_pb2
from services.common.streams import TASK_FIELD, StreamNames
from testing.polling import wait_until_async


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
