"""Deleting a final request everywhere it is kept: the task-stream entries of its images, every
stored object under its key prefix (outputs, the output CSV, whatever another feature stored
there), then its rows. Used by DELETE /requests/{id} and by the retention janitor.

The request is marked `deleting` in Postgres first and its rows go last, so each step can be
repeated: a delete interrupted anywhere (a crash, a store that failed) is finished by the next
call, and a request half deleted is already gone for its owner.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from services.common import failpoints
from services.common.db import lifecycle
from services.common.storage import Storage, request_prefix
from services.common.streams import StreamNames, delete_entries

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Deleted:
    objects: int  # stored objects this call deleted
    bytes: int  # and their total size


async def delete_request(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    names: StreamNames,
    storage: Storage,
    request_id: uuid.UUID,
) -> Deleted | None:
    """Delete the final request `request_id` completely; None (nothing done) when it is gone
    or not final. Raises on a backend failure, leaving the request marked for the next try."""
    async with pool.acquire() as conn:
        if not await lifecycle.mark_deleting(conn, request_id):
            return None
        entries = await lifecycle.stream_entries(conn, request_id)
    await delete_entries(redis, names.tasks, entries)
    objects, size = await storage.delete_prefix(request_prefix(request_id))
    failpoints.crash_here("delete.before_rows")
    async with pool.acquire() as conn:
        await lifecycle.delete_rows(conn, request_id)
    log.info(
        "request deleted",
        extra={"request_id": str(request_id), "objects": objects, "bytes": size},
    )
    return Deleted(objects, size)
