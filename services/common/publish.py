"""Publishing a committed request's ImageTasks to the task stream.

Publishing happens after the ingest commit, so a crash in between leaves a request with
`published_at IS NULL`; `republish_loop` finds those at start-up and periodically afterwards
and publishes them again (the reconciler does too). While an ingest publishes, it holds a
lease on the request so no one else does it twice. Duplicates would be harmless anyway:
outcomes are recorded conditionally.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence

import asyncpg
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import tracing
from services.common.db import queries
from services.common.errors import BACKEND_ERRORS
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
            await queries.renew_publish_lease(conn, request_id)
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
    # The trace of the upload (or retry) being published, for the workers' log lines.
    traceparent = tracing.current_traceparent()
    tasks = [
        task_pb2.ImageTask(
            request_id=str(request_id),
            image_id=image_id,
            input_url=url,
            options=options_pb,
            enqueued_at=now,
            traceparent=traceparent,
        )
        for image_id, url in images
    ]
    entry_ids = await publish_tasks(redis, names, tasks)
    await queries.set_stream_entries(conn, [image_id for image_id, _ in images], entry_ids)


async def republish_pending(
    pool: asyncpg.Pool, redis: aioredis.Redis, names: StreamNames, *, at_start_up: bool = False
) -> int:
    """Publish every accepted request not yet marked published; returns how many.

    Requests an ingest is publishing right now hold a lease and are left alone, except at
    start-up, when this process publishes nothing yet and a lease may be a dead process's.
    """
    async with pool.acquire() as conn:
        items = await queries.unpublished_requests(conn, respect_lease=not at_start_up)
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
    at_start_up = True
    while not stop.is_set():
        try:
            count = await republish_pending(pool, redis, names, at_start_up=at_start_up)
            at_start_up = False
            if count:
                log.warning("republished requests left unpublished", extra={"requests": count})
        except BACKEND_ERRORS as exc:
            log.warning("republish failed; will retry", extra={"error": repr(exc)})
        await wait_or_stop(stop, interval)
