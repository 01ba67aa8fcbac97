"""The reconciler: Postgres is the source of truth, and this loop makes Redis agree with it.

It runs in every worker, but one at a time across the deployment (a Postgres advisory lock).
Each pass:
- finishes cancels whose process died half way (lifecycle.finish_cancel);
- republishes released Pending images whose task is no longer on the stream (Redis losing its
  data, anything else that drops a task); images not yet released wait for the feeder;
- finishes requests whose images are all final but which were never marked final;
- publishes request.finished for final requests whose event is not known to be published;
- trims the streams of entries every group has acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import storage as keys
from services.common.db import lifecycle, queries
from services.common.grpc_server import wait_or_stop
from services.common.publish import publish_releases
from services.common.servicer_errors import BACKEND_ERRORS
from services.common.stored_csv import store_output_csv
from services.common.streams import StreamNames, live_entries, trim_acknowledged
from services.worker.processor import Processor

log = logging.getLogger(__name__)

# pg_advisory_lock key of the reconciler: "reconcile" as an integer, recognisable in pg_locks.
LEADER_LOCK_KEY = int.from_bytes(b"reconcil", "big")
BATCH = 1000
EVENTS_KEPT_WITHOUT_GROUPS = 100_000


@dataclass(frozen=True, slots=True)
class Pass:
    cancelled: int = 0
    republished: int = 0
    finished: int = 0
    events: int = 0
    trimmed: int = 0
    leader: bool = True


class Reconciler:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        names: StreamNames,
        processor: Processor,
        min_age: float,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.names = names
        self.processor = processor
        self.min_age = min_age

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        while not await wait_or_stop(stop, interval):
            try:
                result = await self.reconcile_once()
            except BACKEND_ERRORS as exc:
                log.warning("reconcile pass failed; will retry", extra={"error": repr(exc)})
                continue
            if result.cancelled or result.republished or result.finished or result.events:
                log.warning("reconciled", extra=_fields(result))

    async def reconcile_once(self) -> Pass:
        """One pass, if no other reconciler is running; Pass(leader=False) otherwise."""
        async with queries.leader_lock(self.pool, LEADER_LOCK_KEY) as conn:
            if conn is None:
                return Pass(leader=False)
            return Pass(
                cancelled=await self._finish_cancels(conn),
                republished=await self._republish_lost(conn),
                finished=await self._finish_complete(conn),
                events=await self._publish_missing_events(conn),
                trimmed=await self._trim(),
            )

    async def _finish_cancels(self, conn: queries.Connection) -> int:
        """Finish the cancels whose process died after marking the request, as that process
        would have: the images not final fail CANCELLED, the request is Cancelled, its output
        CSV is stored and its event published."""
        request_ids = await lifecycle.cancels_left_half_done(
            conn, min_age_seconds=self.min_age, limit=BATCH
        )
        for request_id in request_ids:
            row = await lifecycle.finish_cancel(
                conn, request_id, output_csv_key=keys.output_csv_key(request_id)
            )
            if row is None:  # the cancel finished meanwhile
                continue
            await store_output_csv(self.pool, self.processor.storage, request_id)
            await self.processor.announce(queries.Counters.of(row))
            await self.processor.publish_finished(row)
        return len(request_ids)

    async def _republish_lost(self, conn: queries.Connection) -> int:
        """Republish released tasks whose stream entry is gone. Only released images count:
        those still waiting for their turn are the feeder's (services/ingest/feeder.py)."""
        stale = await queries.stale_pending_images(conn, min_age_seconds=self.min_age, limit=BATCH)
        if not stale:
            return 0
        recorded = [s.stream_entry_id for s in stale if s.stream_entry_id]
        live = await live_entries(self.redis, self.names, recorded)
        lost = [s for s in stale if s.stream_entry_id not in live]
        by_request: dict[uuid.UUID, queries.Release] = {}
        for image in lost:
            release = by_request.setdefault(
                image.request_id, queries.Release(image.request_id, image.options, [])
            )
            release.images.append((image.image_id, image.input_url))
        return await publish_releases(
            conn,
            self.redis,
            self.names,
            list(by_request.values()),
            released_at={image.image_id: image.enqueued_at for image in lost},
        )

    async def _finish_complete(self, conn: queries.Connection) -> int:
        request_ids = await queries.unfinished_complete_requests(
            conn, min_age_seconds=self.min_age, limit=BATCH
        )
        for request_id in request_ids:
            await self.processor.finish_if_complete(request_id)
        return len(request_ids)

    async def _publish_missing_events(self, conn: queries.Connection) -> int:
        requests = await queries.unpublished_finished_requests(
            conn, min_age_seconds=self.min_age, limit=BATCH
        )
        for request in requests:
            await self.processor.publish_finished(request)
        return len(requests)

    async def _trim(self) -> int:
        try:
            return await trim_acknowledged(
                self.redis, self.names.tasks, keep_without_groups=None
            ) + await trim_acknowledged(
                self.redis, self.names.events, keep_without_groups=EVENTS_KEPT_WITHOUT_GROUPS
            )
        except RedisError as exc:
            log.warning("trimming failed", extra={"error": repr(exc)})
            return 0


def _fields(result: Pass) -> dict[str, int]:
    return {
        "cancelled": result.cancelled,
        "republished": result.republished,
        "finished": result.finished,
        "events": result.events,
        "trimmed": result.trimmed,
    }
