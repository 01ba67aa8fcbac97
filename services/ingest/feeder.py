"""The feeder: releases the backlog that Postgres holds onto the task stream, a window at a time,
in fair shares (docs/scheduling.md).

Ingest commits a request's images as Pending and not released; it does not XADD them. The
feeder keeps at most `window` tasks released and not yet final (counted in Postgres, so a lost
stream entry still counts until the reconciler republishes it), and of them not yet delivered to
a worker, at most what the workers take in `lookahead_seconds` (lookahead.py; `lookahead` at
most), so that a newcomer waits behind little work it did not choose.
Whenever there is room it asks FairShare whose share of the workers' time is smallest, XADDs
those tasks and records their stream entries, which marks them released. It runs in every
ingest, one at a time across the deployment (a Postgres advisory lock taken for each pass, as
the reconciler does), and wakes when this ingest commits a request or retries images, and every
`poll` seconds to see workers' progress; every `idle_poll` seconds instead while nothing is
released or waiting, since then only a commit or a retry, which wake it, can give it work, or
an image a worker put back to wait (a retry's backoff), whose time the pass looks up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis

from services.common import metrics
from services.common.db import queries
from services.common.grpc_server import wait_any, wait_or_stop
from services.common.publish import publish_releases
from services.common.servicer_errors import BACKEND_ERRORS
from services.common.streams import StreamNames, task_stream_state
from services.ingest.config import DEFAULT_LOOKAHEAD, DEFAULT_LOOKAHEAD_SECONDS
from services.ingest.fair_share import FairShare, Waiting
from services.ingest.lookahead import Lookahead, Window

log = logging.getLogger(__name__)

# pg_advisory_lock key of the feeder: "feedtask" as an integer, recognisable in pg_locks.
LEADER_LOCK_KEY = int.from_bytes(b"feedtask", "big")
# Open requests considered in one pass; more wait for the next pass (oldest first).
MAX_REQUESTS_PER_PASS = 1000
# After a failed pass (Postgres or Redis down), wait this long before the next.
RETRY_SECONDS = 1.0
# Between passes while the window is empty and nothing waits (another replica's commits
# reach this one's feeder only through the poll, so not much longer).
IDLE_POLL_SECONDS = 1.0
# An idle feeder's pass comes this long after the next deferred image is due (the database's
# clock and this process's may differ a little).
DUE_SLACK = 0.01
# How long the workers believe "a request is starved" (_report_starved) without a new pass:
# many passes at the busy poll, and short enough that a stopped feeder's word soon expires.
STARVED_TTL_MS = 2000


@dataclass(frozen=True, slots=True)
class FeedPass:
    released: int = 0
    in_window: int = 0  # released and not final before this pass
    leader: bool = True
    room: int = 0  # what this pass could release (window and lookahead allowing)
    lookahead: int = 0  # the tasks that could wait on the stream (Lookahead.limit)
    due: float | None = None  # when idle: seconds until the next deferred image is due

    @property
    def idle(self) -> bool:
        """The leader found nothing in flight and nothing to release."""
        return self.leader and self.released == 0 and self.in_window == 0

    def sleep(self, poll: float, idle_poll: float) -> float:
        """How long to wait for a wake before the next pass."""
        if not self.idle:
            return poll
        return idle_poll if self.due is None else min(idle_poll, self.due + DUE_SLACK)


class Feeder:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        names: StreamNames,
        window: int,
        lookahead: int = DEFAULT_LOOKAHEAD,
        lookahead_seconds: float = DEFAULT_LOOKAHEAD_SECONDS,
        weights: Mapping[str, int] | None = None,
        poll: float = 0.1,
        idle_poll: float = IDLE_POLL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.names = names
        self.window = window
        self.lookahead = Lookahead(lookahead, lookahead_seconds)
        self.poll = poll
        self.idle_poll = max(poll, idle_poll)
        self.clock = clock  # charges the workers' slot time (FairShare)
        known = dict(weights or {})
        # An owner without a configured weight (auth off, a key since removed) weighs 1.
        self.share = FairShare(lambda owner: known.get(owner, 1))
        self._wake = asyncio.Event()
        self._starved = False  # what the last pass reported (_report_starved)

    def wake(self) -> None:
        """Release soon: new work was committed (called by the servicer, never blocks)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """A service loop: a pass whenever woken and every `poll` seconds, until `stop`.
        At shutdown it simply stops releasing: what is released stays on the stream for the
        workers, what is not stays in Postgres for the next leader."""
        while not stop.is_set():
            self._wake.clear()  # before the pass: a wake during it means another pass
            try:
                result = await self.feed_once()
            except BACKEND_ERRORS as exc:
                log.warning("feeding failed; will retry", extra={"error": repr(exc)})
                await wait_or_stop(stop, RETRY_SECONDS)
                continue
            if result.released and result.released >= result.room:
                continue  # more may be waiting, and the workers may have freed room meanwhile
            await wait_any(self._wake, stop, timeout=result.sleep(self.poll, self.idle_poll))

    async def feed_once(self) -> FeedPass:
        """One pass if no other feeder is in one; FeedPass(leader=False) otherwise."""
        async with queries.leader_lock(self.pool, LEADER_LOCK_KEY) as conn:
            return FeedPass(leader=False) if conn is None else await self._feed(conn)

    async def _feed(self, conn: queries.Connection) -> FeedPass:
        # What workers hold is what is scarce: tasks still on the stream hold no slot. The
        # group delivers in stream order, so an entry past its last delivered id is waiting.
        stream = await task_stream_state(self.redis, self.names)
        in_use = await queries.window_in_use(conn, stream.last_delivered_key)
        in_window = sum(u.released for u in in_use)
        seen = Window(
            held=sum(u.held for u in in_use),
            on_stream=sum(u.on_stream for u in in_use),
            added=stream.added,
        )
        lookahead = self.lookahead.limit(seen, self.clock())
        metrics.FEEDER_LOOKAHEAD.set(lookahead)
        room = min(self.window - in_window, lookahead - seen.on_stream)
        held = [Waiting(u.request_id, u.owner, 0, u.held) for u in in_use if u.held]
        # Every pass keeps the accounts (who waits, the slot time used), room or not.
        waiting = await queries.waiting_requests(
            conn, up_to=max(1, room), limit=MAX_REQUESTS_PER_PASS
        )
        plan = self.share.plan(_open_requests(waiting, held), max(0, room), self.clock())
        count = await self._release(conn, dict(plan)) if plan else 0
        await self._report_starved(room <= 0 and _starved(waiting, in_use))
        # Requests with nothing left to release are marked published (the reconciler finishes
        # only those), including ones with no images at all.
        await queries.mark_released(conn)
        result = FeedPass(
            released=count, in_window=in_window, room=max(0, room), lookahead=lookahead
        )
        if result.idle:  # images put back to wait for a later time need no wake to come due
            return dataclasses.replace(result, due=await queries.next_due(conn))
        return result

    async def _report_starved(self, starved: bool) -> None:
        """Tell the workers (streams.slot_demand) that a request waits with nothing on the
        stream and no room to put anything there: a task that waits for a connection then
        gives its slot back, which takes an entry off the stream and makes room. Refreshed
        every pass while true, so it expires soon after a feeder that stops."""
        if starved:
            await self.redis.set(self.names.starved, b"1", px=STARVED_TTL_MS)
        elif self._starved:
            await self.redis.delete(self.names.starved)
        self._starved = starved

    async def _release(self, conn: queries.Connection, plan: dict[uuid.UUID, int]) -> int:
        releases = await queries.next_waiting_images(conn, plan)
        released = await publish_releases(conn, self.redis, self.names, releases)
        await queries.mark_started(conn, [r.request_id for r in releases])
        return released


def _starved(waiting: list[queries.WaitingRequest], in_use: list[queries.InUse]) -> bool:
    """Whether a request waits with no task on the stream: with no room, it can get none."""
    on_stream = {u.request_id for u in in_use if u.on_stream}
    return any(w.waiting and w.request_id not in on_stream for w in waiting)


def _open_requests(waiting: list[queries.WaitingRequest], held: list[Waiting]) -> list[Waiting]:
    """Requests with images waiting (oldest first), then those with tasks held only."""
    tasks = {h.request_id: h.held for h in held}
    requests = [
        Waiting(w.request_id, w.owner, w.waiting, tasks.get(w.request_id, 0)) for w in waiting
    ]
    listed = {w.request_id for w in waiting}
    return requests + [h for h in held if h.request_id not in listed]
