"""Putting ImageTasks on the task stream and recording where each one went.

The feeder (services/ingest/feeder.py) releases the backlog here a window at a time; the
reconciler republishes a released task whose stream entry was lost. Setting the image's stream
entry marks it released. A crash between the XADD and that update leaves the image waiting, so
it is released again: a duplicate on the stream is harmless, as outcomes are recorded
conditionally.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Sequence

import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp

from services.common import tracing
from services.common.db import queries
from services.common.image_options import ImageOptions, from_json, to_json, to_proto
from services.common.pb.imgpipe.v1 import task_pb2
from services.common.streams import StreamNames, publish_tasks

log = logging.getLogger(__name__)


async def publish_images(
    conn: queries.Connection,
    redis: aioredis.Redis,
    names: StreamNames,
    request_id: uuid.UUID,
    options: ImageOptions,
    images: Sequence[tuple[int, str]],
) -> None:
    """XADD the tasks of `images` (image_id, url) and record their stream entries."""
    release = queries.Release(
        request_id, to_json(options), list(images), tracing.current_traceparent()
    )
    await publish_releases(conn, redis, names, [release])


async def publish_releases(
    conn: queries.Connection,
    redis: aioredis.Redis,
    names: StreamNames,
    releases: Sequence[queries.Release],
) -> int:
    """XADD the tasks of several requests, taking turns between them, in one pipelined round
    trip; record their stream entries. Returns how many were published.

    The workers read the stream in order, so turns here mean a request's first tasks are not
    queued behind another request's whole share of the same release."""
    now = Timestamp()
    now.GetCurrentTime()
    tasks = []
    for turn in itertools.zip_longest(*(_tasks(r, now) for r in releases)):
        tasks += [task for task in turn if task is not None]
    if not tasks:
        return 0
    entry_ids = await publish_tasks(redis, names, tasks)
    await queries.set_stream_entries(conn, [task.image_id for task in tasks], entry_ids)
    return len(tasks)


def _tasks(release: queries.Release, now: Timestamp) -> list[task_pb2.ImageTask]:
    options_pb = to_proto(from_json(release.options))
    return [
        task_pb2.ImageTask(
            request_id=str(release.request_id),
            image_id=image_id,
            input_url=url,
            options=options_pb,
            enqueued_at=now,
            # The trace of the upload (or retry), for the workers' log lines.
            traceparent=release.traceparent,
        )
        for image_id, url in release.images
    ]
