"""Putting ImageTasks on the task stream and recording where each one went.

The feeder (services/ingest/feeder.py) releases the backlog here a window at a time; the
reconciler republishes a released task whose stream entry was lost. A release claims its
images first (their enqueued_at becomes the claim's token), then XADDs their tasks, then
records each entry where the claim still holds (queries.claim_releases). A crash after the
claim leaves the image released with no entry, which the reconciler republishes once it is
older than IMGPIPE_RECONCILE_MIN_AGE; a crash after the XADD leaves a task that a worker takes
as usual. A duplicate on the stream is harmless, as outcomes are recorded conditionally.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from redis.exceptions import RedisError

from services.common import failpoints, metrics
from services.common.db import queries
from services.common.image_options import from_json, to_proto
from services.common.pb.imgpipe.v1 import task_pb2
from services.common.streams import StreamNames, publish_tasks

log = logging.getLogger(__name__)


async def publish_releases(
    conn: queries.Connection,
    redis: aioredis.Redis,
    names: StreamNames,
    releases: Sequence[queries.Release],
    *,
    released_at: Mapping[int, datetime] | None = None,
) -> int:
    """Claim the images of several requests, XADD their tasks, taking turns between requests,
    in one pipelined round trip, and record their stream entries. Returns how many were
    published. An image must be waiting, or, for a republish, still released at the time
    `released_at` gives for it (so two republishes of one image cannot both happen).

    The workers read the stream in order, so turns here mean a request's first tasks are not
    queued behind another request's whole share of the same release."""
    now = Timestamp()
    now.GetCurrentTime()
    tasks = []
    for turn in itertools.zip_longest(*(_tasks(r, now) for r in releases)):
        tasks += [task for task in turn if task is not None]
    if not tasks:
        return 0
    seen = released_at or {}
    claim = await queries.claim_releases(conn, [(t.image_id, seen.get(t.image_id)) for t in tasks])
    tasks = [task for task in tasks if task.image_id in claim.image_ids]
    if not tasks:
        return 0
    failpoints.crash_here("release.after_claim")
    try:
        entry_ids = await publish_tasks(redis, names, tasks)
    except RedisError:
        # Put them back to wait for the next pass rather than for the reconciler. Tasks the
        # pipeline did add are duplicates of the next release, which is harmless.
        await queries.unclaim_releases(conn, claim)
        raise
    failpoints.crash_here("release.after_xadd")
    recorded = await queries.record_releases(
        conn, claim, [task.image_id for task in tasks], entry_ids
    )
    metrics.RELEASES_SUPERSEDED.inc(len(tasks) - recorded)
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
