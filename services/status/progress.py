"""Live progress fan-out: one Redis subscription per status process, any number of watchers.

Workers PUBLISH a small RequestEvent on `<prefix>:progress:<request id>` whenever an image of
the request becomes final. The hub holds one pattern subscription and hands each message to the
in-process watchers of that request, so a thousand watchers of one request cost what one does:
no per-watcher Redis subscription and no per-watcher Postgres polling. Pub/sub is at most once,
so the hub bumps `epoch` whenever its subscription was re-established, and watchers re-read the
request from Postgres then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError

from services.common.db import queries
from services.common.grpc_server import wait_or_stop
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.proto_convert import progress_event
from services.common.servicer_errors import BACKEND_ERRORS
from services.common.streams import StreamNames

log = logging.getLogger(__name__)

BACKOFF_MAX = 5.0
REFRESH_SECONDS = 10.0


class Watch:
    """What one watcher sees: the newest progress event (older ones are superseded)."""

    def __init__(self) -> None:
        self.latest: request_pb2.RequestEvent | None = None
        self.changed = asyncio.Event()
        self.stale = False  # the hub reconnected: re-read the request

    def offer(self, event: request_pb2.RequestEvent) -> None:
        self.latest = event
        self.changed.set()

    def take(self) -> tuple[request_pb2.RequestEvent | None, bool]:
        event, stale = self.latest, self.stale
        self.latest, self.stale = None, False
        self.changed.clear()
        return event, stale


class ProgressHub:
    def __init__(self, redis: aioredis.Redis, names: StreamNames) -> None:
        self.redis = redis
        self.names = names
        self._watches: dict[str, set[Watch]] = defaultdict(set)
        self.connected = asyncio.Event()

    @contextlib.asynccontextmanager
    async def watch(self, request_id: str) -> AsyncIterator[Watch]:
        watch = Watch()
        self._watches[request_id].add(watch)
        try:
            yield watch
        finally:
            self._watches[request_id].discard(watch)
            if not self._watches[request_id]:
                del self._watches[request_id]

    @property
    def watchers(self) -> int:
        return sum(len(w) for w in self._watches.values())

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(self.names.progress_pattern)
                self.connected.set()
                if failures:
                    self._mark_stale()  # messages may have been missed while disconnected
                failures = 0
                while not stop.is_set():
                    message: Any = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._route(message)
            except (RedisError, OSError) as exc:
                self.connected.clear()
                failures += 1
                log.warning("progress subscription lost", extra={"error": repr(exc)})
                await wait_or_stop(stop, min(BACKOFF_MAX, 0.2 * 2**failures))
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def run_refresh(self, stop: asyncio.Event, pool: asyncpg.Pool) -> None:
        """Every REFRESH_SECONDS, one query for all watched requests: a progress message lost
        on the way (pub/sub is at most once) delays a watcher, never strands it."""
        while not await wait_or_stop(stop, REFRESH_SECONDS):
            watched = list(self._watches)
            if not watched:
                continue
            try:
                async with pool.acquire() as conn:
                    found = await queries.counters_of(conn, [uuid.UUID(r) for r in watched])
            except BACKEND_ERRORS as exc:
                log.warning("progress refresh failed", extra={"error": repr(exc)})
                continue
            for counters in found:
                event = progress_event(counters)
                for watch in self._watches.get(event.request_id, ()):
                    watch.offer(event)

    def _route(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        request_id = (channel.decode() if isinstance(channel, bytes) else channel).rsplit(":", 1)[
            -1
        ]
        watches = self._watches.get(request_id)
        if not watches:
            return
        event = request_pb2.RequestEvent()
        try:
            event.ParseFromString(message["data"])
        except DecodeError:
            log.warning("undecodable progress message", extra={"channel": str(channel)})
            return
        for watch in watches:
            watch.offer(event)

    def _mark_stale(self) -> None:
        for watches in self._watches.values():
            for watch in watches:
                watch.stale = True
                watch.changed.set()
