"""Publishing a committed request's ImageTasks to the task stream.

Publishing happens after the ingest commit, so a crash in between leaves a request with
`published_at IS NULL`; `republish_loop` finds those at start-up and periodically afterwards
and publishes them again. Duplicates are harmless: workers skip images that are already final.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence

import asyncpg
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from redis.exceptions import RedisError

from services.common.db import queries
from services.common.grpc_server import wait_or_stop
from services.common.imaging import ImageOptions
from services.common.pb.imgpipe.v1 import task_pb2
from services.common.proto_convert import from_json, to_proto
from services.common.streams import StreamNames, publish_tasks

log = logging.getLogger(__name__)

BATCH = 1000


async def publish_request(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    names: StreamNames,
    request_id: uuid.UUID,
    options: ImageOptions,
) -> int:
    """Publish one ImageTask per Pending image, in pipelined batches; then mark it published."""
    published = 0
    async with pool.acquire() as conn:
        async for batch in queries.pending_images(conn, request_id, batch=BATCH):
            await publish_images(conn, redis, names, request_id, options, batch)
            published += len(batch)
        await queries.mark_published(conn, request_id)
    log.info("published", extra={"request_id": str(request_id), "tasks": published})
    return published


async def publish_images(
    conn: queries.Connection,
    redis: aioredis.Redis,
    names: StreamNames,
    request_id: uuid.UUID,
    options: ImageOptions,
    images: Sequence[tuple[int, str]],
) -> None:
    """XADD the tasks of `images` (image_id, url) and record their stream entries."""
    now = Timestamp()
    now.GetCurrentTime()
    options_pb = to_proto(options)
    tasks = [
        task_pb2.ImageTask(
            request_id=str(request_id),
            image_id=image_id,
            input_url=url,
            options=options_pb,
            enqueued_at=now,
        )
        for image_id, url in images
    ]
    entry_ids = await publish_tasks(redis, names, tasks)
    await queries.set_stream_entries(conn, [image_id for image_id, _ in images], entry_ids)


async def republish_pending(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: StreamNames, *, min_age_seconds: float = 0.0
) -> int:
    """Publish every accepted request not yet marked published; returns how many.

    `min_age_seconds` skips requests an upload handler may be publishing right now.
    """
    async with pool.acquire() as conn:
        items = await queries.unpublished_requests(conn, min_age_seconds=min_age_seconds)
    for item in items:
        await publish_request(pool, redis, names, item.request_id, from_json(item.options))
    return len(items)


async def republish_loop(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    names: StreamNames,
    stop: asyncio.Event,
    *,
    interval: float = 30.0,
) -> None:
    """At start-up, then every `interval` seconds until `stop` is set."""
    min_age = 0.0  # at start-up nothing of ours is in flight: take everything
    while not stop.is_set():
        try:
            count = await republish_pending(pool, redis, names, min_age_seconds=min_age)
            min_age = interval
            if count:
                log.warning("republished requests left unpublished", extra={"requests": count})
        except (RedisError, OSError, asyncpg.PostgresError) as exc:
            log.warning("republish failed; will retry", extra={"error": str(exc)})
        await wait_or_stop(stop, interval)
