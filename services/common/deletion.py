"""Deleting a final request everywhere it is kept: the task-stream entries of its images, its
events on the events stream, every stored object under its key prefix (outputs, the output CSV,
whatever another feature stored there), then its rows. Used by DELETE /requests/{id} and by the
retention janitor.

The request is marked `deleting` in Postgres first and its rows go last, so each step can be
repeated: a delete interrupted anywhere (a crash, a store that failed) is finished by the next
call, and a request half deleted is already gone for its owner.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError

from services.common import failpoints
from services.common.db import lifecycle
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.storage import Storage, request_prefix
from services.common.streams import EVENT_FIELD, StreamNames, _text, delete_entries

log = logging.getLogger(__name__)

# The events stream's ids are Redis's clock, the request's times Postgres's: the window an
# event of the request is looked for in is this much wider on each side.
CLOCK_MARGIN = timedelta(minutes=10)
# Events read per XRANGE while looking for a request's.
SCAN_BATCH = 1000


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
        window = await lifecycle.event_window(conn, request_id)
    await delete_entries(redis, names.tasks, entries)
    if window is not None:
        await delete_events(redis, names, request_id, window)
    objects, size = await storage.delete_prefix(request_prefix(request_id))
    failpoints.crash_here("delete.before_rows")
    async with pool.acquire() as conn:
        await lifecycle.delete_rows(conn, request_id)
    log.info(
        "request deleted",
        extra={"request_id": str(request_id), "objects": objects, "bytes": size},
    )
    return Deleted(objects, size)


async def delete_events(
    redis: aioredis.Redis, names: StreamNames, request_id: uuid.UUID, window: lifecycle.EventWindow
) -> int:
    """XDEL the request's entries from the events stream; returns how many there were.

    Where an event went is recorded nowhere, so the entries published within the request's
    window (from its creation to its last event) are read, a batch at a time, and those of the
    request are deleted: repeating it finds nothing more to delete."""
    cursor = _stream_id(window.since - CLOCK_MARGIN)
    end = "+" if window.until is None else _stream_id(window.until + CLOCK_MARGIN)
    ours: list[str] = []
    while True:
        batch: Any = await redis.xrange(names.events, min=cursor, max=end, count=SCAN_BATCH)
        ours.extend(entry_id for entry_id, fields in batch if _of_request(fields, request_id))
        if len(batch) < SCAN_BATCH:
            break
        cursor = "(" + _text(batch[-1][0])
    return await delete_entries(redis, names.events, [_text(entry_id) for entry_id in ours])


def _stream_id(moment: datetime) -> str:
    """The id prefix of the entries added at `moment` (its milliseconds)."""
    return str(max(0, int(moment.timestamp() * 1000)))


def _of_request(fields: dict[bytes, bytes] | None, request_id: uuid.UUID) -> bool:
    event = request_pb2.RequestEvent()
    try:
        event.ParseFromString((fields or {}).get(EVENT_FIELD, b""))
    except DecodeError:
        return False  # not an event of ours: left for whoever wrote it
    return event.request_id == str(request_id)
