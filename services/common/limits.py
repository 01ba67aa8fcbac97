"""Per-key limits, kept in Redis so every replica of every service counts against one budget.

- **rate**: a GCRA (generic cell rate algorithm, a token bucket kept as one timestamp) per owner,
  checked for every authenticated gRPC call by `ApiKeyInterceptor`. A REST call is charged for
  the gRPC calls the gateway makes for it (one each; `GET /status` makes two).
  The same bucket (`take_token`) throttles webhook redeliveries per owner.
- **concurrent**: a sorted set per owner of its unfinished request ids, scored by the time the
  slot was taken. Ingest takes a slot when an upload starts and gives it back if the upload is
  refused or fails. Nothing has to free a slot when a request finishes: when an owner is at its
  limit, the set is checked against Postgres and finished requests leave it, as do reservations
  that never became a request (an ingest that crashed mid-upload) once they are
  `STALE_RESERVATION` old. So a crash can never hold a slot forever.
- **uploads**: a sorted set per owner of the uploads it is sending now, each scored by when its
  lease expires. Ingest takes a lease when an upload starts (before reading its body), renews it
  while the upload is received and stored, and removes it at the end. A lease that is not
  renewed (its process died) expires after `UPLOAD_LEASE` seconds and is dropped by the next
  take, so a crash never holds an upload slot for long.
- **images_per_day**: a counter per owner and UTC day, which expires two days later. Ingest
  reserves a request's images once its CSV is validated, before the commit, and gives them back
  if the commit fails.
- **streams**: a sorted set per owner of its open live-progress streams (WatchRequest, which
  the gateway's SSE route opens once per stream), scored by when each lease runs out. A stream
  renews its lease every `STREAM_LEASE / 3` seconds and removes it when it ends; a process that
  dies stops renewing, and its leases are dropped by the next check once `STREAM_LEASE` passed.

Every check-and-take is one Lua script, so two uploads arriving at once cannot both take the
last slot. Times come from the Redis server's clock, so hosts with skewed clocks still agree.

Every give-back runs to its end even when its caller is cancelled meanwhile (`_give_back`):
grpc.aio cancels a handler as soon as its client cancels the call, often while the handler's
`finally` is giving a lease back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from services.common.auth import Principal, Quota
from services.common.db import queries
from services.common.db.lifecycle import FINAL
from services.common.errors import Detail, RateLimited
from services.common.servicer_errors import BACKEND_ERRORS
from services.common.streams import StreamNames

log = logging.getLogger(__name__)

DAY = 86_400
# A slot whose request is not in Postgres this long after it was taken belongs to an upload
# that died; longer than any upload takes (the gateway's upload deadline is 300 s).
STALE_RESERVATION = 900.0
# When a slot may free up is unknown; callers are told to try again after this long.
CONCURRENT_RETRY_AFTER = 5
# An upload's lease on one of its key's `uploads` slots lasts this long unless renewed; it is
# renewed every third of that while the upload is received, so only a dead process lets it lapse.
UPLOAD_LEASE = 30
UPLOADS_RETRY_AFTER = 5

# Scripts that call TIME before writing need effects replication on Redis < 7 (a no-op after).
_EFFECTS = "if redis.replicate_commands then redis.replicate_commands() end\n"

# KEYS[1]: the theoretical arrival time (ms) of the owner's next call.
# ARGV: the emission interval (ms), the burst. Returns {0 (allowed) or the wait in ms, calls
# left in the burst, ms until the bucket is full again}.
_GCRA = (
    _EFFECTS
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now - (burst - 1) * interval
if wait > 0 then return {math.ceil(wait), 0, math.ceil(tat - now)} end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', next_tat), 'PX', math.ceil(next_tat - now) + 1000)
local left = math.floor((now + burst * interval - next_tat) / interval)
return {0, left, math.ceil(next_tat - now)}
"""
)

# KEYS[1]: the owner's unfinished request ids. ARGV: the limit, a request id.
# Returns 1 when the id holds a slot (already, or now), 0 when the owner is at its limit.
_TAKE_SLOT = (
    _EFFECTS
    + """
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], redis.call('TIME')[1], ARGV[2])
return 1
"""
)

# KEYS[1]: the owner's uploads in progress, scored by lease expiry (s). ARGV: the limit, an
# upload id, the lease (s). Expired leases are dropped first. Returns 1 when taken, else 0.
_TAKE_UPLOAD = (
    _EFFECTS
    + """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
"""
)

# Same keys and arguments: push an existing lease's expiry forward (never re-creates one).
_RENEW_UPLOAD = (
    _EFFECTS
    + """
local now = tonumber(redis.call('TIME')[1])
local renewed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return renewed
"""
)

# KEYS[1]: images accepted today. ARGV: the limit, this upload's images, the key's lifetime.
# Returns {1, used after} when taken, {0, used} when it would go over the limit.
_TAKE_IMAGES = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local count = tonumber(ARGV[2])
if used + count > tonumber(ARGV[1]) then return {0, used} end
redis.call('INCRBY', KEYS[1], count)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, used + count}
"""


# KEYS[1]: the owner's open streams. ARGV: the limit, a stream id, the lease (ms).
# Returns 1 when the stream holds a lease now, 0 when the owner is at its limit.
_TAKE_STREAM = (
    _EFFECTS
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""
)

# KEYS[1]: the owner's open streams. ARGV: a stream id, the lease (ms). Extends a held lease.
_RENEW_STREAM = (
    _EFFECTS
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""
)

# How long a stream's lease lasts without renewal: how long the slots of a process that died
# stay taken.
STREAM_LEASE = 60.0
# When a stream may free up is unknown; callers are told to try again after this long.
STREAM_RETRY_AFTER = 5


Report = Callable[[Quota], Awaitable[None]]


async def _ignore(_: Quota) -> None:
    pass


@dataclass(frozen=True, slots=True)
class ImageReservation:
    key: str
    count: int


class Limiter:
    """The per-key limits (docs/usage.md, "Authentication and limits"), for one Redis and one
    Postgres."""

    def __init__(self, redis: aioredis.Redis, names: StreamNames, pool: asyncpg.Pool) -> None:
        self.redis = redis
        self.pool = pool
        self.prefix = f"{names.prefix}:limits"
        self._gcra = redis.register_script(_GCRA)
        self._take_slot = redis.register_script(_TAKE_SLOT)
        self._take_images = redis.register_script(_TAKE_IMAGES)
        self._take_stream = redis.register_script(_TAKE_STREAM)
        self._renew_stream = redis.register_script(_RENEW_STREAM)
        self._take_upload = redis.register_script(_TAKE_UPLOAD)
        self._renew_upload = redis.register_script(_RENEW_UPLOAD)

    # ------------------------------------------------------------ rate

    async def check_rate(self, principal: Principal, report: Report = _ignore) -> None:
        """Charge one call to the caller; RateLimited when it is over its rate. `report` is
        told the caller's quota first, refused or not (no limit: not called)."""
        limits = principal.limits
        rate = f"rate={rate_text(limits.rate)} burst={limits.burst}"
        await self.take_token(
            f"rate:{principal.name}",
            limits.rate,
            limits.burst,
            refusal=f"over the rate limit of this API key ({rate}); slow down",
            limit=Detail(f"{rate_text(limits.rate)} calls, {limits.burst} at once", "rate"),
            report=report,
        )

    async def take_token(
        self,
        bucket: str,
        rate: float,
        burst: int,
        *,
        refusal: str,
        limit: Detail,
        report: Report = _ignore,
    ) -> None:
        """Take one token from the bucket `bucket` (a name of this limiter's own, with the
        owner in it), refilled at `rate` per second (0: no limit), holding `burst`; when it is
        empty, raise RateLimited with `refusal` and `limit`, and take nothing. `report` is told
        the bucket's state either way."""
        if rate <= 0:
            return
        answer: Any = await self._gcra(
            keys=[f"{self.prefix}:{bucket}"], args=[repr(1000.0 / rate), burst]
        )
        wait_ms, remaining, reset_ms = (int(part) for part in answer)
        window = max(1, math.ceil(burst / rate))
        await report(Quota(burst, remaining, max(0, math.ceil(reset_ms / 1000)), window))
        if wait_ms > 0:
            raise RateLimited(refusal, [limit], retry_after=max(1, math.ceil(wait_ms / 1000)))

    # ------------------------------------------------------------ concurrent

    async def take_slot(self, principal: Principal, request_id: uuid.UUID) -> None:
        """Count `request_id` as one of the caller's unfinished requests; RateLimited when the
        caller already has `concurrent` of them."""
        limit = principal.limits.concurrent
        if limit <= 0:
            return
        key = self._slots(principal.name)
        args: list[Any] = [limit, str(request_id)]
        if await self._take_slot(keys=[key], args=args):
            return
        if await self._forget_finished(key) and await self._take_slot(keys=[key], args=args):
            return
        raise RateLimited(
            f"over the limit of this API key (concurrent={limit} unfinished requests);"
            " retry when one of them is final",
            [Detail(f"at most {limit} unfinished requests", "concurrent")],
            retry_after=CONCURRENT_RETRY_AFTER,
        )

    async def give_back_slot(self, principal: Principal, request_id: uuid.UUID) -> None:
        """Free the slot that `take_slot` took. Not given back (Redis failed), it is freed later:
        a slot with no request behind it goes stale."""
        if principal.limits.concurrent > 0:
            await _give_back("slot", self.redis.zrem(self._slots(principal.name), str(request_id)))

    async def _forget_finished(self, key: str) -> int:
        """Remove the slots of requests that are final or were never stored; how many."""
        held: list[Any] = await self.redis.zrange(key, 0, -1, withscores=True)
        slots: list[tuple[str, uuid.UUID | None, float]] = []
        for member, taken_at in held:
            text = member.decode() if isinstance(member, bytes) else str(member)
            try:
                slots.append((text, uuid.UUID(text), float(taken_at)))
            except ValueError:
                slots.append((text, None, 0.0))  # not ours: always removed
        async with self.pool.acquire() as conn:
            statuses = await queries.request_statuses(
                conn, [request_id for _, request_id, _ in slots if request_id is not None]
            )
        seconds, _ = await self.redis.time()
        gone = []
        for text, request_id, taken_at in slots:
            status = statuses.get(request_id) if request_id is not None else None
            if status in FINAL:
                gone.append(text)
            elif status is None and int(seconds) - taken_at > STALE_RESERVATION:
                gone.append(text)  # an upload that never committed and never gave it back
        if gone:
            await self.redis.zrem(key, *gone)
            log.info("freed finished request slots", extra={"key": key, "slots": len(gone)})
        return len(gone)

    def _slots(self, owner: str) -> str:
        return f"{self.prefix}:unfinished:{owner}"

    # ------------------------------------------------------------ uploads

    @contextlib.asynccontextmanager
    async def upload_lease(self, principal: Principal) -> AsyncIterator[None]:
        """Hold one of the caller's `uploads` slots for the block; RateLimited when they are all
        held by other uploads of the same key."""
        limit = principal.limits.uploads
        if limit <= 0:
            yield
            return
        key, upload = f"{self.prefix}:uploads:{principal.name}", uuid.uuid4().hex
        args: list[Any] = [limit, upload, UPLOAD_LEASE]
        if not await self._take_upload(keys=[key], args=args):
            raise RateLimited(
                f"over the limit of this API key (uploads={limit} uploads being received at a"
                " time); retry when one of them has been answered",
                [Detail(f"at most {limit} uploads at a time", "uploads")],
                retry_after=UPLOADS_RETRY_AFTER,
            )
        renewing = asyncio.create_task(self._keep_upload(key, args))
        try:
            yield
        finally:
            renewing.cancel()
            # Not given back: its lease lapses by itself within UPLOAD_LEASE seconds.
            await _give_back("upload lease", self.redis.zrem(key, upload))

    async def _keep_upload(self, key: str, args: list[Any]) -> None:
        while True:
            await asyncio.sleep(UPLOAD_LEASE / 3)
            try:
                await self._renew_upload(keys=[key], args=args)
            except BACKEND_ERRORS as exc:
                log.warning("upload lease not renewed", extra={"error": repr(exc)})

    # ------------------------------------------------------------ images per day

    async def check_images_left(self, principal: Principal) -> None:
        """Refuse at once an upload from a caller that has used today's images already."""
        limit = principal.limits.images_per_day
        if limit <= 0:
            return
        key, retry_after = await self._today(principal.name)
        used = int(await self.redis.get(key) or 0)
        if used >= limit:
            raise _images_exhausted(limit, used, 0, retry_after)

    async def take_images(self, principal: Principal, count: int) -> ImageReservation | None:
        """Count `count` images against today's budget, or raise RateLimited (nothing taken)."""
        limit = principal.limits.images_per_day
        if limit <= 0 or count <= 0:
            return None
        key, retry_after = await self._today(principal.name)
        taken, used = await self._take_images(keys=[key], args=[limit, count, 2 * DAY])
        if not taken:
            raise _images_exhausted(limit, int(used), count, retry_after)
        return ImageReservation(key, count)

    async def give_back_images(self, reservation: ImageReservation | None) -> None:
        """Return the images that `take_images` counted. Not given back (Redis failed), they
        count until the day ends: the caller's own error matters more."""
        if reservation is not None:
            await _give_back("images", self.redis.decrby(reservation.key, reservation.count))

    async def _today(self, owner: str) -> tuple[str, int]:
        """The owner's counter for the current UTC day, and the seconds until the next one."""
        seconds, _ = await self.redis.time()
        day, elapsed = divmod(int(seconds), DAY)
        return f"{self.prefix}:images:{owner}:{day}", DAY - elapsed

    # ------------------------------------------------------------ streams

    @contextlib.asynccontextmanager
    async def hold_stream(self, principal: Principal | None) -> AsyncIterator[None]:
        """Count one open stream of the caller for as long as the block runs; RateLimited when
        the caller already has `streams` of them. No limit when authentication is off."""
        limit = principal.limits.streams if principal is not None else 0
        if principal is None or limit <= 0:
            yield
            return
        key, stream_id = f"{self.prefix}:streams:{principal.name}", str(uuid.uuid4())
        lease_ms = int(STREAM_LEASE * 1000)
        if not await self._take_stream(keys=[key], args=[limit, stream_id, lease_ms]):
            raise RateLimited(
                f"over the limit of this API key (streams={limit} live progress streams open);"
                " close one, or poll GET /status",
                [Detail(f"at most {limit} streams open at a time", "streams")],
                retry_after=STREAM_RETRY_AFTER,
            )
        renewing = asyncio.create_task(self._keep_stream(key, stream_id, lease_ms))
        try:
            yield
        finally:
            renewing.cancel()
            # Not given back: the lease runs out by itself within STREAM_LEASE seconds.
            await _give_back("stream lease", self.redis.zrem(key, stream_id))

    async def _keep_stream(self, key: str, stream_id: str, lease_ms: int) -> None:
        while True:
            await asyncio.sleep(STREAM_LEASE / 3)
            try:
                await self._renew_stream(keys=[key], args=[stream_id, lease_ms])
            except BACKEND_ERRORS as exc:  # tried again at the next turn, within the lease
                log.warning("stream lease not renewed", extra={"error": repr(exc)})


# Give-backs that outlived their cancelled caller; held here so that they are not collected.
_GIVING_BACK: set[asyncio.Task[Any]] = set()


async def _give_back(what: str, action: Awaitable[Any]) -> None:
    """Run `action`, a give-back, to its end even if the caller is cancelled meanwhile.

    grpc.aio cancels a handler's task as soon as its client cancels the call, and the
    cancellation lands in whatever the handler awaits at that moment: often the `finally` that
    gives a lease back, after the upload ended because its client went away. Cut there, the
    give-back never reached Redis, and the key's slot stayed taken until its lease expired.
    So the give-back runs as a task of its own: a cancelled caller stops at once, and the
    give-back ends by itself. A Redis error is logged as "`what` not given back", never raised:
    the caller is on its way out with an error or a result of its own.
    """
    task = asyncio.ensure_future(action)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():  # the caller was cancelled, not the give-back
            _GIVING_BACK.add(task)
            task.add_done_callback(functools.partial(_given_back, what))
        raise
    except BACKEND_ERRORS as exc:
        log.warning("%s not given back", what, extra={"error": repr(exc)})


def _given_back(what: str, task: asyncio.Task[Any]) -> None:
    _GIVING_BACK.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("%s not given back", what, extra={"error": repr(exc)})


def _images_exhausted(limit: int, used: int, count: int, retry_after: int) -> RateLimited:
    upload = f"; this upload has {count}" if count else ""
    return RateLimited(
        f"over the limit of this API key (images_per_day={limit}): {used} images accepted"
        f" today (UTC){upload}",
        [Detail(f"at most {limit} images per UTC day", "images_per_day")],
        retry_after=max(1, retry_after),
    )


def rate_text(per_second: float) -> str:
    """A rate as people write it: `20/s`, `30/min`, `10/h`."""
    if per_second >= 1:
        return f"{per_second:g}/s"
    if per_second * 60 >= 1:
        return f"{per_second * 60:g}/min"
    return f"{per_second * 3600:g}/h"
