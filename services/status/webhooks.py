"""Webhook delivery by the Standard Webhooks specification (https://www.standardwebhooks.com).

Two loops run in every status replica:

- `run_events` reads `request.finished` events from the events stream through the consumer
  group "webhooks" (its own pending entries first, then new ones, then entries another replica
  left idle too long) and schedules attempt 1 of each in Postgres; an event is acknowledged
  only after its delivery is durable there. An event read twice schedules once.
- `run_deliveries` leases due attempts from Postgres (FOR UPDATE SKIP LOCKED, so replicas
  share the queue), POSTs them through the SSRF-guarded session without following redirects,
  and records every attempt: succeeded on 2xx; abandoned on 410, a blocked address, or when
  the retry schedule is spent; otherwise failed, with the next attempt scheduled after the
  schedule's step (with jitter), or after the receiver's Retry-After when that is longer.

Every attempt of an event sends the same `webhook-id` (the event id, so receivers can
deduplicate) and the same body bytes; the timestamp and signature are made per attempt, with
the secret of the request's owner (services/status/webhook_secrets.py), and the body names
that owner. Redelivery on demand is throttled per owner.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import math
import os
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp.abc import AbstractResolver
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from standardwebhooks.webhooks import EmptyWebhookSecretError, Webhook
from yarl import URL

from services.common import metrics, telemetry, tracing
from services.common.config import ConfigError
from services.common.db import queries
from services.common.db import webhooks as db
from services.common.errors import Conflict, Detail
from services.common.fetch import (
    USER_AGENT,
    check_url,
    failure_from_exception,
    make_session,
    parse_retry_after,
)
from services.common.grpc_server import wait_any, wait_or_stop
from services.common.limits import Limiter, rate_text
from services.common.outcome import ImageFailure, OutcomeCode
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.proto_convert import FINAL_STATUSES, STATUS_TO_PROTO
from services.common.servicer_errors import BACKEND_ERRORS
from services.common.streams import (
    EVENT_FIELD,
    READ_BLOCK_MS,
    Entry,
    GroupReader,
    StreamNames,
)
from services.status.config import WebhookSettings
from services.status.webhook_secrets import (
    NOT_CONFIGURED,
    OwnerSecret,
    WebhookSecrets,
    signature_header,
)

log = logging.getLogger(__name__)

GROUP = "webhooks"
WHO = "the webhook receiver"  # how failure messages name the other side

EVENT_BATCH = 50  # events read per XREADGROUP
CLAIM_INTERVAL = 15.0  # how often entries left idle by a dead replica are looked for
CLAIM_IDLE = 60.0  # scheduling an event takes milliseconds: idle this long, its replica died
CONCURRENCY = 16  # attempts in flight per replica
POLL_INTERVAL = 1.0  # the longest the delivery loop sleeps without being woken
LEASE_MARGIN = 30.0  # seconds a lease outlives the HTTP timeout
JITTER = (0.8, 1.2)
BACKOFF_MAX = 10.0
# Events whose trace an attempt continues, remembered by the replica that scheduled them (the
# "schedule webhook" span). An attempt after a restart continues the request's own trace (its
# upload's or retry's) instead: the same trace, one level up.
TRACES_KEPT = 10_000
# A Retry-After is honoured up to the largest schedule step, and never capped below this.
RETRY_AFTER_FLOOR = 60.0

_EVENT_TYPES = {
    request_pb2.REQUEST_STATUS_COMPLETED: ("request.completed", "Completed"),
    request_pb2.REQUEST_STATUS_FAILED: ("request.failed", "Failed"),
    request_pb2.REQUEST_STATUS_CANCELLED: ("request.cancelled", "Cancelled"),
}
_STATES = {
    db.SCHEDULED: status_pb.WEBHOOK_DELIVERY_STATE_SCHEDULED,
    db.SUCCEEDED: status_pb.WEBHOOK_DELIVERY_STATE_SUCCEEDED,
    db.FAILED: status_pb.WEBHOOK_DELIVERY_STATE_FAILED,
    db.ABANDONED: status_pb.WEBHOOK_DELIVERY_STATE_ABANDONED,
}


def webhook_session(
    settings: WebhookSettings, *, resolver_inner: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """The session attempts are sent with: the fetch guard of image downloads, and as many
    connections to one receiver host as attempts in flight, so that owners sharing a receiver
    host (an integration platform) are bounded by their own turns, not by each other's hung
    connections."""
    return make_session(
        settings.fetch_allow,
        settings.fetch_limits,
        resolver_inner=resolver_inner,
        limit_per_host=CONCURRENCY,
    )


class WebhookDispatcher:
    """Schedules, sends, retries and lists the webhooks of finished requests.

    `session` comes from `webhook_session(settings)`: its connector refuses blocked addresses at
    resolve and at connect time. `consumer` names this replica in the consumer group (default
    `status-<host>-<pid>`).
    """

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        names: StreamNames,
        session: aiohttp.ClientSession,
        settings: WebhookSettings,
        consumer: str | None = None,
        claim_idle: float = CLAIM_IDLE,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.names = names
        self.session = session
        self.settings = settings
        self.consumer = consumer or f"status-{os.uname().nodename}-{os.getpid()}"
        self.claim_idle = claim_idle
        _check_secret(settings.secret)
        self.secrets = WebhookSecrets(settings.secret, grace_seconds=settings.secret_grace)
        self._limiter = Limiter(redis, names, pool)
        # Set when an attempt is scheduled or finishes, so the delivery loop looks at once.
        self._wake = asyncio.Event()
        self._traces: OrderedDict[str, str] = OrderedDict()  # event id -> traceparent

    # ------------------------------------------------------------------ events

    async def run_events(self, stop: asyncio.Event) -> None:
        """Schedule a delivery for every finished request with a webhook_url, until `stop`."""
        reader = GroupReader(self.redis, self.names.events, GROUP, self.consumer)
        await reader.ensure_group()
        failures = 0
        next_claim = 0.0
        while not stop.is_set():
            try:
                entries: list[Entry] = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + CLAIM_INTERVAL
                    entries = await reader.claim_stale(int(self.claim_idle * 1000), EVENT_BATCH)
                if not entries:
                    entries = await reader.read(EVENT_BATCH, READ_BLOCK_MS)
                done = [entry.entry_id for entry in entries if await self._schedule(entry)]
                await reader.ack(done)
                failures = 0
            except BACKEND_ERRORS as exc:
                failures += 1
                delay = min(BACKOFF_MAX, 0.2 * 2**failures)
                log.warning(
                    "reading webhook events failed", extra={"error": repr(exc), "retry_in": delay}
                )
                # What was read but not acknowledged is this consumer's pending: read it again
                # first once the backend answers.
                reader.reread_pending()
                await wait_or_stop(stop, delay)

    async def _schedule(self, entry: Entry) -> bool:
        """Schedule the delivery of one stream entry; True when it may be acknowledged."""
        event = _event(entry)
        if event is None or event.type != request_pb2.REQUEST_EVENT_TYPE_FINISHED:
            return True
        # Its log lines (and its span, with OpenTelemetry) join the trace of the work that
        # finished the request; the attempts continue this span.
        with (
            tracing.bound(tracing.continue_trace(event.traceparent), event.request_id),
            telemetry.span("schedule webhook", parent=event.traceparent, kind="consumer"),
        ):
            self._remember_trace(event.event_id, tracing.current_traceparent())
            return await self._schedule_finished(event)

    def _remember_trace(self, event_id: str, traceparent: str) -> None:
        self._traces[event_id] = traceparent
        self._traces.move_to_end(event_id)
        while len(self._traces) > TRACES_KEPT:
            self._traces.popitem(last=False)

    async def _schedule_finished(self, event: request_pb2.RequestEvent) -> bool:
        try:
            request_id = uuid.UUID(event.request_id)
        except ValueError:
            log.error("webhook event with a bad request id", extra={"event_id": event.event_id})
            return True
        if event.status not in _EVENT_TYPES or not event.event_id:
            log.error("unexpected finished event", extra={"event_id": event.event_id})
            return True
        try:
            async with self.pool.acquire() as conn:
                request = await queries.get_request(conn, request_id)
                if request is None or not request.webhook_url:
                    return True
                event_type, status = _EVENT_TYPES[event.status]
                progress = event.progress
                scheduled = await db.schedule_first_attempt(
                    conn,
                    request_id=request_id,
                    event_id=event.event_id,
                    event_type=event_type,
                    url=request.webhook_url,
                    payload=self._payload(
                        event_type,
                        request,
                        status,
                        (progress.images_total, progress.images_done, progress.images_failed),
                        _occurred(event.occurred_at),
                    ),
                )
        except BACKEND_ERRORS:
            raise
        except Exception:
            # Left pending: taken over and tried again after CLAIM_IDLE.
            log.exception("scheduling a webhook failed", extra={"event_id": event.event_id})
            return False
        if scheduled:
            log.info("webhook scheduled", extra={"event_id": event.event_id})
            self._wake.set()
        return True

    def _payload(
        self,
        event_type: str,
        request: queries.RequestRow,
        status: str,
        counts: tuple[int, int, int],
        occurred: datetime,
    ) -> str:
        """The thin Standard Webhooks envelope, as the exact text that is signed and sent.

        It names the request's owner, so a receiver shared by several owners knows whose
        secret must have signed it; with no owner (one tenant) the envelope is as it was."""
        base = self.settings.public_api_url.rstrip("/")
        request_id = request.id
        total, done, failed = counts
        owner = {"owner": request.owner} if request.owner else {}
        envelope = {
            "type": event_type,
            "timestamp": _iso(occurred),
            "data": {
                **owner,
                "request_id": str(request_id),
                "status": status,
                "images_total": total,
                "images_done": done,
                "images_failed": failed,
                "output_csv_url": f"{base}/requests/{request_id}/output.csv",
                "status_url": f"{base}/status/{request_id}",
            },
        }
        return json.dumps(envelope, separators=(",", ":"))

    # ------------------------------------------------------------------ deliveries

    async def run_deliveries(self, stop: asyncio.Event) -> None:
        """Send due attempts, at most CONCURRENCY at once, until `stop`; then let the ones in
        flight finish (they are bounded by the timeout; a cancelled one lets its lease lapse and
        is sent again later)."""
        if not self.secrets.configured:
            log.warning(NOT_CONFIGURED + "; every webhook will be recorded as abandoned")
        in_flight: set[asyncio.Task[None]] = set()
        failures = 0
        try:
            while not stop.is_set():
                self._wake.clear()
                pause = POLL_INTERVAL
                free = CONCURRENCY - len(in_flight)
                if free > 0:
                    try:
                        due, next_due = await self._claim(free)
                        failures = 0
                    except BACKEND_ERRORS as exc:
                        failures += 1
                        pause = min(BACKOFF_MAX, 0.2 * 2**failures)
                        log.warning(
                            "claiming webhooks failed",
                            extra={"error": repr(exc), "retry_in": pause},
                        )
                    else:
                        for delivery, secret in due:
                            task = asyncio.create_task(self._deliver(delivery, secret))
                            in_flight.add(task)
                            task.add_done_callback(in_flight.discard)
                        # Due now and not taken: an owner at its limit, or another replica's
                        # claim. A finished attempt wakes the loop; else the poll comes.
                        if next_due is not None and next_due > 0:
                            pause = min(POLL_INTERVAL, max(next_due, 0.02))
                # Woken early by a new schedule (run_events, redeliver) or a finished attempt.
                await wait_any(stop, self._wake, timeout=pause)
        finally:
            if in_flight:
                log.info("finishing webhooks in flight", extra={"attempts": len(in_flight)})
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def _claim(
        self, limit: int
    ) -> tuple[list[tuple[db.DeliveryRow, OwnerSecret]], float | None]:
        """Lease up to `limit` due attempts, each with the secrets that sign it; when there
        were fewer, also the seconds until the next one is due (None: nothing is scheduled)."""
        lease = self.settings.timeout + LEASE_MARGIN
        async with self.pool.acquire() as conn:
            due = await db.claim_due(
                conn, limit=limit, lease_seconds=lease, per_owner=self.settings.per_owner
            )
            ids = list({d.request_id for d in due})
            states = await db.signing_generations(conn, ids) if ids else {}
            signed = [(d, self._secret_of(states.get(d.request_id))) for d in due]
            if len(due) == limit:
                return signed, None
            return signed, await db.seconds_until_due(conn)

    def _secret_of(self, state: db.SecretGeneration | None) -> OwnerSecret:
        # No state: the request is gone (its attempts go with it); sign as for no owner.
        return self.secrets.of(state or db.SecretGeneration("", 1, None, False, None))

    async def _deliver(self, delivery: db.DeliveryRow, secret: OwnerSecret) -> None:
        # A task of its own (see run_deliveries): these values are seen by this attempt alone.
        traceparent = self._traces.get(delivery.event_id) or delivery.traceparent
        tracing.set_trace(tracing.continue_trace(traceparent))
        tracing.set_request_id(str(delivery.request_id))
        attributes: dict[str, str | int] = {
            "imgpipe.event_id": delivery.event_id,
            "imgpipe.attempt": delivery.attempt,
        }
        with telemetry.span("deliver webhook", parent=traceparent, attributes=attributes):
            await self._attempt(delivery, secret)

    async def _attempt(self, delivery: db.DeliveryRow, secret: OwnerSecret) -> None:
        try:
            outcome = await self._send(delivery, secret)
            metrics.WEBHOOK_ATTEMPTS.labels(outcome.result).inc()
            retry_in = None
            state = outcome.state
            error = outcome.error
            if state == db.FAILED:
                retry_in = self._retry_delay(delivery.attempt, outcome.retry_after)
                if retry_in is None:
                    state = db.ABANDONED
                    error = f"{error}; gave up after {delivery.attempt} attempts"
            async with self.pool.acquire() as conn:
                recorded = await db.record_attempt(
                    conn,
                    delivery,
                    state=state,
                    status_code=outcome.status_code,
                    error=error,
                    retry_in=retry_in,
                )
            log.info(
                "webhook attempt",
                extra={
                    "event_id": delivery.event_id,
                    "attempt": delivery.attempt,
                    "receiver": _origin(delivery.url),
                    "state": state,
                    "status_code": outcome.status_code,
                    "error": error,
                    "retry_in": retry_in,
                    "recorded": recorded,
                },
            )
        except BACKEND_ERRORS as exc:
            # Not recorded: the lease lapses and the attempt is made again.
            log.warning(
                "recording a webhook attempt failed",
                extra={"event_id": delivery.event_id, "error": repr(exc)},
            )
        except Exception:
            log.exception("webhook attempt failed unexpectedly", extra={"id": delivery.id})
        finally:
            self._wake.set()

    async def _send(self, delivery: db.DeliveryRow, secret: OwnerSecret) -> _Outcome:
        if not self.secrets.configured:
            return _Outcome(db.ABANDONED, None, NOT_CONFIGURED, result="not_configured")
        try:
            check_url(self.session, delivery.url)
            headers = _signed_headers(secret.signing, delivery.event_id, delivery.payload)
            timeout = aiohttp.ClientTimeout(
                total=self.settings.timeout,
                sock_connect=min(self.settings.timeout, self.settings.fetch_limits.connect_timeout),
            )
            async with self.session.post(
                delivery.url,
                data=delivery.payload.encode(),
                headers=headers,
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                return _answer_outcome(response)
        except ImageFailure as failure:
            return _failure_outcome(failure)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            return _failure_outcome(failure_from_exception(exc, who=WHO))

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float | None:
        return retry_delay(
            self.settings.schedule,
            attempt,
            retry_after,
            floor=max(RETRY_AFTER_FLOOR, self.settings.fetch_limits.max_retry_after),
        )

    # ------------------------------------------------------------------ API

    async def list_deliveries(self, request_id: uuid.UUID) -> list[status_pb.WebhookDelivery]:
        """Every attempt for the request, oldest first."""
        async with self.pool.acquire() as conn:
            rows = await db.list_deliveries(conn, request_id)
        return [_message(row) for row in rows]

    async def redeliver(self, request: queries.RequestRow) -> status_pb.WebhookDelivery:
        """Send the request's latest event again, now: the attempt already scheduled is brought
        forward, or a new attempt is scheduled. Conflict when the request is not final or has
        no webhook_url; RateLimited when its owner redelivers faster than the settings allow
        (each redelivery is a signed POST to a URL of the caller's choosing)."""
        if request.status not in FINAL_STATUSES:
            raise Conflict(
                f"request {request.id} is {request.status}: its webhook is sent once it is"
                " Completed, Failed or Cancelled"
            )
        if not request.webhook_url:
            raise Conflict(f"request {request.id} has no webhook_url")
        await self._throttle_redelivery(request.owner)
        event_type = _EVENT_TYPES[STATUS_TO_PROTO[request.status]][0]
        payload = self._payload(
            event_type,
            request,
            request.status,
            (request.images_total, request.images_done, request.images_failed),
            request.completed_at or request.updated_at,
        )
        for _ in range(5):
            async with self.pool.acquire() as conn:
                row = await db.redeliver(
                    conn,
                    request_id=request.id,
                    event_id=request.finished_event_id,
                    event_type=event_type,
                    url=request.webhook_url,
                    payload=payload,
                )
            if row is not None:
                log.info(
                    "webhook redelivery scheduled",
                    extra={"event_id": row.event_id, "attempt": row.attempt},
                )
                self._wake.set()
                return _message(row)
        raise Conflict(f"request {request.id}: its webhook is being redelivered already")

    async def _throttle_redelivery(self, owner: str) -> None:
        rate, burst = self.settings.redeliver_rate, self.settings.redeliver_burst
        shown = f"{rate_text(rate)}, {burst} at once"
        await self._limiter.take_token(
            f"redeliver:{owner}",
            rate,
            burst,
            refusal=f"webhook redeliveries are throttled per owner ({shown}); try again later",
            limit=Detail(f"{shown}: IMGPIPE_WEBHOOK_REDELIVER_RATE", "redeliver"),
        )


# ---------------------------------------------------------------------- pure parts


@dataclass(frozen=True, slots=True)
class _Outcome:
    state: str
    status_code: int | None
    error: str | None
    retry_after: float | None = None
    result: str = "error"  # the attempt's label in metrics.WEBHOOK_ATTEMPTS


def _answer_outcome(response: aiohttp.ClientResponse) -> _Outcome:
    status = response.status
    answer = f"{status} {response.reason}" if response.reason else str(status)
    if 200 <= status < 300:
        return _Outcome(db.SUCCEEDED, status, None, result="succeeded")
    result = {4: "http_4xx", 5: "http_5xx"}.get(status // 100, "http_other")
    if status == 410:
        return _Outcome(
            db.ABANDONED, status, f"{WHO} answered {answer}: no more attempts", result=result
        )
    error = f"{WHO} answered {answer}"
    if 300 <= status < 400:
        error += ", a redirect; redirects are not followed"
    retry_after = parse_retry_after(response.headers.get(aiohttp.hdrs.RETRY_AFTER))
    if retry_after:
        error += f"; it asked us to retry in {math.ceil(retry_after)} s"
    return _Outcome(db.FAILED, status, error, retry_after, result)


def _failure_outcome(failure: ImageFailure) -> _Outcome:
    # A refused address or URL will be refused again: no retries. Everything else (timeouts,
    # connection errors, a broken answer) may pass later.
    state = db.ABANDONED if failure.code == OutcomeCode.BLOCKED_ADDRESS else db.FAILED
    result = _FAILURE_RESULTS.get(failure.code, "error")
    return _Outcome(state, None, str(failure), result=result)


_FAILURE_RESULTS = {
    OutcomeCode.TIMEOUT: "timeout",
    OutcomeCode.CONNECTION: "connection",
    OutcomeCode.BLOCKED_ADDRESS: "blocked",
}


def retry_delay(
    schedule: Sequence[float], attempt: int, retry_after: float | None, *, floor: float
) -> float | None:
    """Seconds until the attempt after `attempt` (1-based), or None when the schedule is spent.

    The schedule's step for `attempt`, times a jitter factor, so receivers that failed together
    are not retried together; the receiver's Retry-After wins when it is longer, capped at the
    largest schedule step (and at least at `floor`)."""
    if attempt > len(schedule):
        return None
    delay = schedule[attempt - 1] * random.uniform(*JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, max(max(schedule), floor)))
    return delay


def _signed_headers(secrets: tuple[str, ...], event_id: str, payload: str) -> dict[str, str]:
    """Standard Webhooks headers; the timestamp and signature are new on every attempt, with
    one signature per secret (two during a rotation's grace period)."""
    sent_at = datetime.now(UTC)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(math.floor(sent_at.timestamp())),
        "webhook-signature": signature_header(secrets, event_id, sent_at, payload),
        "Content-Type": "application/json",
        "User-Agent": f"{USER_AGENT} (webhooks)",
    }


def _check_secret(secret: str) -> None:
    if not secret:
        return
    try:
        Webhook(secret)
    except (binascii.Error, ValueError, EmptyWebhookSecretError) as exc:
        raise ConfigError(
            [f"IMGPIPE_WEBHOOK_SECRET: not a valid whsec_<base64> secret ({exc})"]
        ) from None


def _message(row: db.DeliveryRow) -> status_pb.WebhookDelivery:
    message = status_pb.WebhookDelivery(
        event_id=row.event_id,
        event_type=row.event_type,
        url=row.url,
        attempt=row.attempt,
        state=_STATES[row.state],
        status_code=row.status_code or 0,
        error=row.error or "",
    )
    message.created_at.FromDatetime(row.created_at)
    if row.attempted_at is not None:
        message.attempted_at.FromDatetime(row.attempted_at)
    if row.next_attempt_at is not None:
        message.next_attempt_at.FromDatetime(row.next_attempt_at)
    return message


def _occurred(stamp: Timestamp) -> datetime:
    if stamp.seconds or stamp.nanos:
        return stamp.ToDatetime(tzinfo=UTC)
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _origin(url: str) -> str:
    """scheme://host:port of a webhook URL, for logs (its path and query may hold tokens)."""
    try:
        parsed = URL(url)
        return f"{parsed.scheme}://{parsed.host}:{parsed.port}"
    except (ValueError, TypeError):
        return "(invalid URL)"


# ---------------------------------------------------------------------- the events stream


def _event(entry: Entry) -> request_pb2.RequestEvent | None:
    """The RequestEvent in an entry; None when there is nothing usable in it."""
    payload = (entry.fields or {}).get(EVENT_FIELD)
    if payload is None:
        return None  # a pending entry whose data was trimmed
    event = request_pb2.RequestEvent()
    try:
        event.ParseFromString(payload)
    except DecodeError:
        log.error("undecodable webhook event dropped", extra={"entry_id": entry.entry_id})
        return None
    return event
