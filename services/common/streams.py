"""Redis Streams: the task stream with its consumer group, the dead letters, the events stream.

Payloads are serialized protobuf (`ImageTask`, `RequestEvent`) in one field, so the streams
have a versioned contract. Consumers acknowledge only after the outcome is durable in Postgres;
entries of a consumer that died are taken over with XAUTOCLAIM; an entry delivered too often
goes to the dead-letter stream. Trimming never removes an entry some group has not acknowledged.
"""

from __future__ import annotations

import contextlib
import logging
import time
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
# How long a reader's XREADGROUP waits for entries; it also bounds how long a SIGTERM waits for
# the read to return, and IMGPIPE_REDIS_TIMEOUT must exceed it (config.LONGEST_REDIS_BLOCK).
READ_BLOCK_MS = 1000
# How long "this event was published" is remembered, so republishing it is a no-op.
EVENT_DEDUP_SECONDS = 7 * 24 * 3600
# Entries per XDEL when a request is deleted.
DELETE_BATCH = 1000

# XADD only if the event id was never published: SET NX and XADD in one atomic step.
_PUBLISH_ONCE = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  return redis.call('XADD', KEYS[1], '*', 'event', ARGV[1])
end
return false
"""


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

    @property
    def tasks_added(self) -> str:
        """How many entries were ever added to the task stream (the feeder's turnover count)."""
        return f"{self.prefix}:tasks:added"

    @property
    def starved(self) -> str:
        """Set by the feeder while a request waits with no task on the stream and no room."""
        return f"{self.prefix}:feeder:starved"

    def event_published(self, event_id: str) -> str:
        return f"{self.prefix}:events:published:{event_id}"

    def progress(self, request_id: str) -> str:
        """The pub/sub channel of a request's live progress."""
        return f"{self.prefix}:progress:{request_id}"

    @property
    def progress_pattern(self) -> str:
        return f"{self.prefix}:progress:*"


async def publish_tasks(
    redis: aioredis.Redis, names: StreamNames, tasks: Sequence[task_pb2.ImageTask]
) -> list[str]:
    """XADD every task, and count them in `names.tasks_added`, in one pipelined round trip;
    returns the entry ids, in order."""
    if not tasks:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for task in tasks:
            pipe.xadd(names.tasks, {TASK_FIELD: task.SerializeToString()})
        pipe.incrby(names.tasks_added, len(tasks))
        *entry_ids, _ = await pipe.execute()
    return [_text(entry_id) for entry_id in entry_ids]


async def publish_event_once(
    redis: aioredis.Redis, names: StreamNames, event: request_pb2.RequestEvent
) -> bool:
    """Publish `event` unless an event with its id was already published; True if it was now."""
    added = await redis.eval(
        _PUBLISH_ONCE,
        2,
        names.events,
        names.event_published(event.event_id),
        event.SerializeToString(),
        EVENT_DEDUP_SECONDS,
    )
    return bool(added)


async def publish_progress(
    redis: aioredis.Redis, names: StreamNames, events: Sequence[request_pb2.RequestEvent]
) -> None:
    """Live progress over pub/sub, in one round trip: at most once, for watchers; Postgres
    stays the truth."""
    async with redis.pipeline(transaction=False) as pipe:
        for event in events:
            pipe.publish(names.progress(event.request_id), event.SerializeToString())
        await pipe.execute()


async def delete_entries(redis: aioredis.Redis, stream: str, entry_ids: Sequence[str]) -> int:
    """XDEL `entry_ids` from `stream` in batches; returns how many were still there. A consumer
    group that has one of them pending gets it back as deleted from XAUTOCLAIM and drops it."""
    deleted = 0
    for start in range(0, len(entry_ids), DELETE_BATCH):
        deleted += int(await redis.xdel(stream, *entry_ids[start : start + DELETE_BATCH]))
    return deleted


@dataclass(frozen=True, slots=True)
class Entry:
    entry_id: str
    fields: dict[bytes, bytes] | None  # None: a pending entry whose data was trimmed
    deliveries: int = 1  # how often the group has handed it out, this time included


class GroupReader:
    """One consumer of a consumer group: its own pending entries first (a restart under the
    same name), then new ones; entries other consumers left idle too long (they died) through
    XAUTOCLAIM. Recreates the group when Redis lost it, and forgets consumers that are gone."""

    def __init__(
        self,
        redis: aioredis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        forget_idle_seconds: float = 3600.0,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.forget_idle_seconds = forget_idle_seconds
        # "0" re-reads this consumer's own pending entries; once they are exhausted we switch
        # to ">" for new entries.
        self._cursor = "0"
        self._claim_cursor = "0-0"

    def reread_pending(self) -> None:
        """Read this consumer's pending entries again first (after a failure mid-batch)."""
        self._cursor = "0"

    async def ensure_group(self) -> None:
        # From the start of the stream: what was published before the first consumer existed
        # is still delivered.
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, count: int, block_ms: int) -> list[Entry]:
        """Up to `count` entries, waiting at most `block_ms` for new ones."""
        try:
            return await self._read(count, block_ms)
        except ResponseError as exc:
            await self._recreate_group(exc)
            return []

    async def _read(self, count: int, block_ms: int) -> list[Entry]:
        reading_pending = self._cursor != ">"
        # redis-py types replies as a union of every RESP shape; ours is RESP2 with bytes.
        response: Any = await self.redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: self._cursor},
            count=count,
            block=None if reading_pending else block_ms,
        )
        entries = response[0][1] if response else []
        if not reading_pending:
            return [Entry(_text(entry_id), fields) for entry_id, fields in entries]
        if not entries:
            self._cursor = ">"
            return await self._read(count, block_ms)
        self._cursor = _text(entries[-1][0])
        return await self._counted(entries)

    async def claim_stale(self, min_idle_ms: int, count: int) -> list[Entry]:
        """Take over up to `count` entries idle for `min_idle_ms` (their consumer died)."""
        try:
            response: Any = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=min_idle_ms,
                start_id=self._claim_cursor,
                count=count,
            )
        except ResponseError as exc:
            await self._recreate_group(exc)
            return []
        self._claim_cursor = _text(response[0])
        entries = [entry for entry in response[1] if entry is not None]
        if entries:
            log.warning(
                "claimed idle entries", extra={"stream": self.stream, "entries": len(entries)}
            )
        if self._claim_cursor == "0-0":
            await self._forget_idle_consumers()
        return await self._counted(entries)

    async def ack(self, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await self.redis.xack(self.stream, self.group, *entry_ids)

    async def _counted(self, entries: list[Any]) -> list[Entry]:
        """Entries with their delivery counts (they are this consumer's pending ones)."""
        if not entries:
            return []
        pending: Any = await self.redis.xpending_range(
            self.stream,
            self.group,
            min=entries[0][0],
            max=entries[-1][0],
            count=len(entries) * 2,
            consumername=self.consumer,
        )
        counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        return [
            Entry(_text(entry_id), fields, counts.get(_text(entry_id), 1))
            for entry_id, fields in entries
        ]

    async def _forget_idle_consumers(self) -> None:
        """Drop consumers that hold nothing and were idle long (pods gone since), once per
        full claim sweep; a live one is recreated by its next read."""
        consumers: Any = await self.redis.xinfo_consumers(self.stream, self.group)
        for consumer in consumers:
            name = _text(consumer["name"])
            idle = int(consumer["idle"]) / 1000
            if (
                name != self.consumer
                and not int(consumer["pending"])
                and idle > self.forget_idle_seconds
            ):
                await self.redis.xgroup_delconsumer(self.stream, self.group, name)

    async def _recreate_group(self, exc: ResponseError) -> None:
        if "NOGROUP" not in str(exc):
            raise exc
        # Redis lost the stream (a restart without persistence): start over. Lost tasks are
        # republished by the reconciler from Postgres.
        log.warning("consumer group missing; recreating it", extra={"stream": self.stream})
        await self.ensure_group()
        self._cursor = "0"
        self._claim_cursor = "0-0"


@dataclass(frozen=True, slots=True)
class Delivery:
    entry_id: str
    task: task_pb2.ImageTask
    deliveries: int = 1  # how often the group has handed this entry out, this time included


class TaskConsumer:
    """A worker's consumer of the task stream: GroupReader entries decoded into ImageTasks;
    an undecodable one goes straight to the dead letters."""

    def __init__(self, redis: aioredis.Redis, names: StreamNames, consumer: str) -> None:
        self.redis = redis
        self.names = names
        self.consumer = consumer
        self.reader = GroupReader(redis, names.tasks, WORKER_GROUP, consumer)

    async def ensure_group(self) -> None:
        await self.reader.ensure_group()

    async def read(self, count: int, block_ms: int) -> list[Delivery]:
        return await self._decode(await self.reader.read(count, block_ms))

    async def claim_stale(self, min_idle_ms: int, count: int) -> list[Delivery]:
        return await self._decode(await self.reader.claim_stale(min_idle_ms, count))

    async def ack(self, entry_ids: Sequence[str]) -> None:
        await self.reader.ack(entry_ids)

    async def _decode(self, entries: list[Entry]) -> list[Delivery]:
        deliveries = []
        for entry in entries:
            payload = (entry.fields or {}).get(TASK_FIELD)
            if payload is None:
                await self.ack([entry.entry_id])  # its data was trimmed: nothing to process
                continue
            task = task_pb2.ImageTask()
            try:
                task.ParseFromString(payload)
            except DecodeError:
                log.error(
                    "undecodable task moved to dead letter", extra={"entry_id": entry.entry_id}
                )
                await self.redis.xadd(
                    self.names.dead, {TASK_FIELD: payload, b"error": b"undecodable payload"}
                )
                await self.ack([entry.entry_id])
                continue
            deliveries.append(Delivery(entry.entry_id, task, entry.deliveries))
        return deliveries

    async def dead_letter(self, delivery: Delivery, code: str, message: str) -> None:
        """Move a task that was delivered too often to the dead-letter stream, and ack it."""
        await self.redis.xadd(
            self.names.dead,
            {
                TASK_FIELD: delivery.task.SerializeToString(),
                b"entry_id": delivery.entry_id,
                b"deliveries": str(delivery.deliveries),
                b"error_code": code,
                b"error_message": message,
                b"consumer": self.consumer,
                b"dead_at": str(int(time.time())),
            },
        )
        await self.ack([delivery.entry_id])


@dataclass(frozen=True, slots=True)
class TaskStreamState:
    """What the reconciler needs to tell a live entry from a lost one, and the feeder what the
    workers took."""

    exists: bool
    last_delivered: str  # the group's last delivered id ("0-0" when none)
    added: int = 0  # entries ever added (StreamNames.tasks_added)

    def undelivered(self, entry_id: str) -> bool:
        return _id_key(entry_id) > self.last_delivered_key

    @property
    def last_delivered_key(self) -> tuple[int, int]:
        """The last delivered id as (milliseconds, sequence), the stream's order."""
        return _id_key(self.last_delivered)


async def task_stream_state(redis: aioredis.Redis, names: StreamNames) -> TaskStreamState:
    """The group's last delivered id and the count of entries added, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(names.tasks_added)
        pipe.xinfo_groups(names.tasks)
        added, groups = await pipe.execute(raise_on_error=False)
    if isinstance(added, Exception):
        raise added
    added = int(added or 0)
    if isinstance(groups, ResponseError):  # no such stream
        return TaskStreamState(exists=False, last_delivered="0-0", added=added)
    if isinstance(groups, Exception):
        raise groups
    for group in groups:
        if _text(group["name"]) == WORKER_GROUP:
            return TaskStreamState(True, _text(group["last-delivered-id"]), added)
    return TaskStreamState(exists=False, last_delivered="0-0", added=added)


@dataclass(frozen=True, slots=True)
class SlotDemand:
    """Who would use a worker's slot if a task gave it back."""

    # The feeder holds a request back with nothing on the stream, for want of room there.
    starved: bool
    # Tasks on the stream no worker has taken yet, oldest first (at most the count asked).
    waiting: list[task_pb2.ImageTask]


async def slot_demand(redis: aioredis.Redis, names: StreamNames, count: int) -> SlotDemand:
    """The feeder's starved flag and the group's last delivered id in one round trip, then
    the entries after that id, decoded; an entry that does not decode is left out (the worker
    that takes it dead-letters it)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(names.starved)
        pipe.xinfo_groups(names.tasks)
        replies = await pipe.execute(raise_on_error=False)
    starved = replies[0] is not None
    if isinstance(replies[1], ResponseError):  # no such stream
        return SlotDemand(starved, [])
    if isinstance(replies[1], Exception):
        raise replies[1]
    delivered = next(
        (_text(g["last-delivered-id"]) for g in replies[1] if _text(g["name"]) == WORKER_GROUP),
        None,
    )
    if delivered is None:
        return SlotDemand(starved, [])
    milliseconds, sequence = _id_key(delivered)
    entries: Any = await redis.xrange(
        names.tasks, min=f"{milliseconds}-{sequence + 1}", count=count
    )
    waiting = []
    for _, fields in entries:
        task = task_pb2.ImageTask()
        try:
            task.ParseFromString(fields[TASK_FIELD])
        except (KeyError, DecodeError):
            continue
        waiting.append(task)
    return SlotDemand(starved, waiting)


async def live_entries(
    redis: aioredis.Redis, names: StreamNames, entry_ids: Sequence[str]
) -> set[str]:
    """The ids among `entry_ids` still on the task stream and not yet done with: waiting to be
    delivered, or delivered and pending (in flight, or claimable when its consumer died)."""
    state = await task_stream_state(redis, names)
    if not state.exists or not entry_ids:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for entry_id in entry_ids:
            pipe.xrange(names.tasks, min=entry_id, max=entry_id, count=1)
            pipe.xpending_range(names.tasks, WORKER_GROUP, min=entry_id, max=entry_id, count=1)
        replies = await pipe.execute()
    live = set()
    for index, entry_id in enumerate(entry_ids):
        exists, pending = replies[2 * index], replies[2 * index + 1]
        if exists and (pending or state.undelivered(entry_id)):
            live.add(entry_id)
    return live


async def trim_acknowledged(
    redis: aioredis.Redis, key: str, *, keep_without_groups: int | None
) -> int:
    """Trim entries every group has acknowledged; never an unacknowledged one.

    Below the smallest of (each group's oldest pending id, each group's last delivered id)
    every entry was delivered to every group and is no longer pending: acknowledged. A stream
    without groups keeps its newest `keep_without_groups` entries (None: it is not trimmed).
    """
    try:
        groups: Any = await redis.xinfo_groups(key)
    except ResponseError:
        return 0
    if not groups:
        if keep_without_groups is None:
            return 0
        trimmed: int = await redis.xtrim(key, maxlen=keep_without_groups, approximate=True)
        return trimmed
    floor: tuple[int, int] | None = None
    for group in groups:
        bounds = [_id_key(_text(group["last-delivered-id"]))]
        summary: Any = await redis.xpending(key, group["name"])
        if summary["pending"]:
            bounds.append(_id_key(_text(summary["min"])))
        low = min(bounds)
        floor = low if floor is None else min(floor, low)
    if floor is None or floor == (0, 0):
        return 0
    trimmed = await redis.xtrim(key, minid=f"{floor[0]}-{floor[1]}", approximate=False)
    return trimmed


@dataclass(frozen=True, slots=True)
class DeadLetter:
    entry_id: str
    task: task_pb2.ImageTask
    error_code: str
    error_message: str
    deliveries: int
    dead_at: int  # unix seconds


@dataclass(frozen=True, slots=True)
class QueueStats:
    stream_length: int
    in_flight: int
    consumers: int
    dead_letter_length: int
    dead_letters: list[DeadLetter]


async def queue_stats(
    redis: aioredis.Redis, names: StreamNames, *, dead_letter_limit: int
) -> QueueStats:
    """The task stream's length, what is in flight, and the newest dead letters."""
    in_flight = consumers = 0
    try:
        groups: Any = await redis.xinfo_groups(names.tasks)
    except ResponseError:
        groups = []
    for group in groups:
        if _text(group["name"]) == WORKER_GROUP:
            in_flight, consumers = int(group["pending"]), int(group["consumers"])
    dead: Any = await redis.xrevrange(names.dead, count=dead_letter_limit)
    return QueueStats(
        stream_length=int(await redis.xlen(names.tasks)),
        in_flight=in_flight,
        consumers=consumers,
        dead_letter_length=int(await redis.xlen(names.dead)),
        dead_letters=[_dead_letter(_text(entry_id), fields) for entry_id, fields in dead],
    )


def _dead_letter(entry_id: str, fields: dict[bytes, bytes]) -> DeadLetter:
    task = task_pb2.ImageTask()
    # An undecodable payload is itself the reason it is here; show what we have.
    with contextlib.suppress(DecodeError):
        task.ParseFromString(fields.get(TASK_FIELD, b""))
    return DeadLetter(
        entry_id=entry_id,
        task=task,
        error_code=fields.get(b"error_code", b"").decode(),
        error_message=fields.get(b"error_message", fields.get(b"error", b"")).decode(),
        deliveries=int(fields.get(b"deliveries", b"0")),
        dead_at=int(fields.get(b"dead_at", b"0")),
    )


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
