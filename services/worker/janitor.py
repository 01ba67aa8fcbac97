"""The retention janitor: deletes final requests older than IMGPIPE_RETENTION_DAYS, as
DELETE /requests/{id} does (services/common/deletion.py), and finishes deletes that were
interrupted (docs/lifecycle.md).

It runs in every worker, but one at a time across the deployment (a Postgres advisory lock, as
the reconciler), in bounded batches: a pass deletes at most `batch` requests, and the next pass
comes at once while a pass finds a full batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import redis.asyncio as aioredis

from services.common import metrics
from services.common.db import lifecycle, queries
from services.common.deletion import delete_request
from services.common.grpc_server import wait_or_stop
from services.common.servicer_errors import BACKEND_ERRORS
from services.common.storage import Storage
from services.common.streams import StreamNames

log = logging.getLogger(__name__)

# pg_advisory_lock key of the janitor: "janitor!" as an integer, recognisable in pg_locks.
LEADER_LOCK_KEY = int.from_bytes(b"janitor!", "big")
BATCH = 100


@dataclass(frozen=True, slots=True)
class Sweep:
    requests: int = 0
    bytes: int = 0
    leader: bool = True
    full: bool = False  # the batch was full: more may be due


def utc_now() -> datetime:
    return datetime.now(UTC)


class Janitor:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        names: StreamNames,
        storage: Storage,
        retention_days: int,
        batch: int = BATCH,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        """`retention_days` 0 keeps everything; `clock` is what "now" is (tests move it)."""
        self.pool = pool
        self.redis = redis
        self.names = names
        self.storage = storage
        self.retention = timedelta(days=retention_days) if retention_days else None
        self.batch = batch
        self.clock = clock

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        if self.retention is None:
            log.info("retention is off (IMGPIPE_RETENTION_DAYS=0): requests are kept")
            return
        full = False
        while full or not await wait_or_stop(stop, interval):
            if stop.is_set():
                return
            try:
                sweep = await self.sweep_once()
            except BACKEND_ERRORS as exc:
                log.warning("retention pass failed; will retry", extra={"error": repr(exc)})
                full = False
                continue
            full = sweep.full
            if sweep.requests:
                log.info(
                    "expired requests deleted",
                    extra={"requests": sweep.requests, "bytes": sweep.bytes},
                )

    async def sweep_once(self) -> Sweep:
        """One bounded pass if no other janitor is in one; Sweep(leader=False) otherwise."""
        if self.retention is None:
            return Sweep()
        async with queries.leader_lock(self.pool, LEADER_LOCK_KEY) as conn:
            if conn is None:
                return Sweep(leader=False)
            due = await lifecycle.expired_requests(
                conn, completed_before=self.clock() - self.retention, limit=self.batch
            )
            # The lock is held for the whole pass; each delete uses connections of its own.
            requests = size = 0
            for request_id in due:
                deleted = await delete_request(
                    self.pool, self.redis, self.names, self.storage, request_id
                )
                if deleted is not None:
                    requests += 1
                    size += deleted.bytes
                    metrics.RETENTION_REQUESTS.inc()
                    metrics.RETENTION_BYTES.inc(deleted.bytes)
        return Sweep(requests, size, full=len(due) >= self.batch)
