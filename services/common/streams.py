"""Redis Streams: the task stream with its consumer group, and the events stream.

Payloads are serialized protobuf (`ImageTask`, `RequestEvent`) in one field, so the streams
have a versioned contract. Consumers acknowledge only after the outcome is durable in Postgres.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import ResponseError

from services.common.pb.imgpipe.v1 import request_pb2, task_pb2

log = logging.getLogger(__name__)

TASK_FIELD = b"task"
EVENT_FIELD = b"event"
WORKER_GROUP = "workers"


@dataclass(frozen=True, slots=True)
class StreamNames:
    """Every key imgpipe uses in Redis starts with one prefix, so test runs never collide."""

    prefix: str = "imgpipe"

    @property
    def tasks(self) -> str:
        return f"{self.prefix}:tasks"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:tasks:dead"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"


async def publish_tasks(
    redis: aioredis.Redis, names: StreamNames, tasks: Sequence[task_pb2.ImageTask]
) -> list[bytes]:
    """XADD every task in one pipelined round trip; returns the entry ids."""
    if not tasks:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for task in tasks:
            pipe.xadd(names.tasks, {TASK_FIELD: task.SerializeToString()})
        return list(await pipe.execute())


async def publish_event(
    redis: aioredis.Redis, names: StreamNames, event: request_pb2.RequestEvent
) -> None:
    await redis.xadd(names.events, {EVENT_FIELD: event.SerializeToString()})


@dataclass(frozen=True, slots=True)
class Delivery:
    entry_id: bytes
    task: task_pb2.ImageTask


class TaskConsumer:
    """One consumer of the workers group: its own pending entries first, then new ones."""

    def __init__(self, redis: aioredis.Redis, names: StreamNames, consumer: str) -> None:
        self.redis = redis
        self.names = names
        self.consumer = consumer
        # "0" re-reads this consumer's own pending entries (a restart with the same name);
        # once they are exhausted we switch to ">" for new entries.
        self._cursor = b"0"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.names.tasks, WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int, block_ms: int) -> list[Delivery]:
        reading_pending = self._cursor != b">"
        # redis-py types replies as a union of every RESP shape; ours is RESP2 with bytes.
        response: Any = await self.redis.xreadgroup(
            WORKER_GROUP,
            self.consumer,
            {self.names.tasks: self._cursor},
            count=count,
            block=None if reading_pending else block_ms,
        )
        entries = response[0][1] if response else []
        if reading_pending:
            if not entries:
                self._cursor = b">"
                return await self.read(count, block_ms)
            self._cursor = entries[-1][0]
        deliveries = []
        for entry_id, fields in entries:
            delivery = await self._decode(entry_id, fields)
            if delivery is not None:
                deliveries.append(delivery)
        return deliveries

    async def _decode(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> Delivery | None:
        payload = (fields or {}).get(TASK_FIELD)
        if payload is None:
            # A pending entry whose data was trimmed away: nothing to process, release it.
            await self.ack([entry_id])
            return None
        task = task_pb2.ImageTask()
        try:
            task.ParseFromString(payload)
        except DecodeError:
            log.error("undecodable task moved to dead letter", extra={"entry_id": entry_id})
            await self.redis.xadd(self.names.dead, {TASK_FIELD: payload, b"error": b"undecodable"})
            await self.ack([entry_id])
            return None
        return Delivery(entry_id, task)

    async def ack(self, entry_ids: Sequence[bytes]) -> None:
        if entry_ids:
            await self.redis.xack(self.names.tasks, WORKER_GROUP, *entry_ids)
