"""Webhook delivery against real Postgres and Redis, and receivers on 127.0.0.1 that verify
every request with `standardwebhooks`, as a merchant's endpoint would."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg
import pytest
import redis.asyncio
from aiohttp.abc import AbstractResolver, ResolveResult
from google.protobuf.timestamp_pb2 import Timestamp
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.common import tracing
from services.common.csv_format import ProductRow
from services.common.db import queries
from services.common.db import webhooks as webhooks_db
from services.common.errors import Conflict
from services.common.fetch import FetchAllow, FetchLimits
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.streams import EVENT_FIELD, StreamNames
from services.status.config import WebhookSettings
from services.status.webhook_secrets import NOT_CONFIGURED
from services.status.webhooks import GROUP, WebhookDispatcher, retry_delay, webhook_session
from testing.databases import own_database
from testing.listeners import Receiver, Tripwire, serve_receiver
from testing.polling import wait_until_async

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"imgpipe-webhook-test-key").decode()
API = "https://imgpipe.example"
FAST = (0.05, 0.05, 0.05)
S = status_pb.WebhookDeliveryState


# ---------------------------------------------------------------- receivers and tripwires


class StaticResolver(AbstractResolver):
    """Every name resolves to `address`, as a hostile DNS answer would."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=self.address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


# ---------------------------------------------------------------- fixtures


@pytest.fixture
async def pool(postgres_server_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A database of this test's own: the dispatcher sends every due row in its database."""
    async with own_database(postgres_server_url, "imgpipe_webhooks") as pool:
        yield pool


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve_receiver(SECRET) as served:
        yield served


@pytest.fixture
async def tripwire() -> AsyncIterator[Tripwire]:
    async with Tripwire("127.0.0.1").listening() as wire:
        yield wire


def settings_for(receiver: Receiver, **changes: Any) -> WebhookSettings:
    settings = WebhookSettings(
        secret=SECRET,
        public_api_url=API,
        timeout=5.0,
        schedule=FAST,
        fetch_allow=FetchAllow.parse(f"127.0.0.1:{receiver.port}"),
        fetch_limits=FetchLimits(
            connect_timeout=2.0, total_timeout=5.0, stall_timeout=5.0, max_redirects=0
        ),
    )
    return replace(settings, **changes)


@dataclass
class Running:
    dispatcher: WebhookDispatcher
    stop: asyncio.Event


@contextlib.asynccontextmanager
async def running(
    pool: asyncpg.Pool,
    client: redis.asyncio.Redis,
    names: StreamNames,
    settings: WebhookSettings,
    *,
    consumer: str = "status-test",
    claim_idle: float = 60.0,
    resolver: AbstractResolver | None = None,
    quiet: bool = True,
) -> AsyncIterator[Running]:
    """A dispatcher with both loops running, as the status service runs it; stopped (and
    checked not to have crashed) on exit. `quiet`: it must log no warning or error either, so
    a failure its loops survive (and retry forever) does not go unnoticed."""
    session = webhook_session(settings, resolver_inner=resolver)
    complaints = Complaints()
    logger = logging.getLogger("services.status.webhooks")
    logger.addHandler(complaints)
    try:
        dispatcher = WebhookDispatcher(
            pool=pool,
            redis=client,
            names=names,
            session=session,
            settings=settings,
            consumer=consumer,
            claim_idle=claim_idle,
        )
        stop = asyncio.Event()
        loops = [
            asyncio.create_task(dispatcher.run_events(stop)),
            asyncio.create_task(dispatcher.run_deliveries(stop)),
        ]
        try:
            yield Running(dispatcher, stop)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*loops), timeout=15)
    finally:
        logger.removeHandler(complaints)
        await session.close()
    if quiet:
        assert complaints.messages == []


class Complaints(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname}: {record.getMessage()} {record.__dict__}")


# ---------------------------------------------------------------- requests and events


async def finished_request(
    pool: asyncpg.Pool,
    webhook_url: str | None,
    *,
    failed: bool = False,
    owner: str = "",
    traceparent: str = "",
) -> queries.RequestRow:
    """A request of two images, finished: one done and one failed (both failed: Failed)."""
    request_id = uuid.uuid4()
    async with pool.acquire() as conn:
        await queries.insert_request(
            conn,
            request_id,
            options={},
            webhook_url=webhook_url,
            owner=owner,
            idempotency_key=None,
            traceparent=traceparent,
        )
        product = ProductRow(2, "1", "Shoe", ("http://a.example/1.jpg", "http://a.example/2.jpg"))
        images = await queries.insert_products(conn, request_id, [product])
        await queries.complete_request_insert(
            conn, request_id, products_total=1, images_total=images, content_hash=b"hash"
        )
        [release] = await queries.next_waiting_images(conn, {request_id: 2})
        (first, _), (second, _) = release.images
        if failed:
            await queries.record_image_failed(conn, first, code="TIMEOUT", message="slow")
        else:
            await queries.record_image_done(
                conn,
                first,
                output_key=f"requests/{request_id}/images/{first}.jpg",
                bytes_in=100,
                bytes_out=50,
                width=8,
                height=8,
                kept_source=False,
            )
        await queries.record_image_failed(conn, second, code="HTTP_STATUS", message="404")
        row = await queries.finish_request(
            conn, request_id, output_csv_key=f"requests/{request_id}/output.csv"
        )
    assert row is not None
    return row


def finished_event(row: queries.RequestRow) -> request_pb2.RequestEvent:
    occurred = Timestamp()
    occurred.FromDatetime(row.completed_at or row.updated_at)
    return request_pb2.RequestEvent(
        event_id=row.finished_event_id,
        type=request_pb2.REQUEST_EVENT_TYPE_FINISHED,
        request_id=str(row.id),
        status=(
            request_pb2.REQUEST_STATUS_COMPLETED
            if row.status == "Completed"
            else request_pb2.REQUEST_STATUS_FAILED
        ),
        progress=request_pb2.Progress(
            images_total=row.images_total,
            images_done=row.images_done,
            images_failed=row.images_failed,
            percent=100.0,
        ),
        occurred_at=occurred,
        output_csv_key=row.output_csv_key or "",
    )


async def publish(
    client: redis.asyncio.Redis, names: StreamNames, event: request_pb2.RequestEvent
) -> str:
    entry_id: Any = await client.xadd(names.events, {EVENT_FIELD: event.SerializeToString()})
    return str(entry_id.decode())


async def all_acknowledged(
    client: redis.asyncio.Redis, names: StreamNames, last_entry_id: str
) -> bool:
    """The webhooks group has read up to `last_entry_id` and holds nothing pending."""
    groups: Any = await client.xinfo_groups(names.events)
    for group in groups:
        if group["name"] == GROUP.encode():
            return bool(
                group["last-delivered-id"].decode() == last_entry_id and not group["pending"]
            )
    return False


async def deliveries_where(
    dispatcher: WebhookDispatcher,
    request_id: uuid.UUID,
    states: list[status_pb.WebhookDeliveryState.ValueType],
) -> list[status_pb.WebhookDelivery]:
    """Wait until the request's attempts are exactly in `states`, oldest first."""

    async def reached() -> list[status_pb.WebhookDelivery] | None:
        deliveries = await dispatcher.list_deliveries(request_id)
        return deliveries if [d.state for d in deliveries] == states else None

    return await wait_until_async(reached, timeout=15, message=f"deliveries in states {states}")


def when(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime()


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("failed", [False, True], ids=["completed", "failed"])
async def test_a_finished_request_is_delivered_signed_with_a_thin_payload(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    receiver: Receiver,
    failed: bool,
) -> None:
    row = await finished_request(pool, receiver.url("/hooks/imgpipe?token=abc"), failed=failed)
    async with running(pool, redis_client, names, settings_for(receiver)) as run:
        entry_id = await publish(redis_client, names, finished_event(row))
        [delivery] = await deliveries_where(
            run.dispatcher, row.id, [S.WEBHOOK_DELIVERY_STATE_SUCCEEDED]
        )
        await wait_until_async(lambda: all_acknowledged(redis_client, names, entry_id))

    assert receiver.rejected == []
    [got] = receiver.received
    event_type = "request.failed" if failed else "request.completed"
    assert got.payload == {
        "type": event_type,
        "timestamp": got.payload["timestamp"],
        "data": {
            "request_id": str(row.id),
            "status": "Failed" if failed else "Completed",
            "images_total": 2,
            "images_done": 0 if failed else 1,
            "images_failed": 2 if failed else 1,
            "output_csv_url": f"{API}/requests/{row.id}/output.csv",
            "status_url": f"{API}/status/{row.id}",
        },
    }
    assert row.completed_at is not None
    sent_time = datetime.fromisoformat(got.payload["timestamp"])
    assert abs((sent_time - row.completed_at).total_seconds()) < 0.001
    assert got.headers["webhook-id"] == row.finished_event_id == f"evt_{row.id.hex}_0"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"].startswith("imgpipe/")
    with pytest.raises(WebhookVerificationError):  # signed with our secret, not any other
        Webhook("whsec_" + base64.b64encode(b"some-other-secret-123456").decode()).verify(
            got.body, got.headers
        )

    assert delivery.event_id == row.finished_event_id
    assert delivery.event_type == event_type
    assert delivery.url == receiver.url("/hooks/imgpipe?token=abc")
    assert (delivery.attempt, delivery.status_code, delivery.error) == (1, 200, "")
    assert delivery.HasField("attempted_at") and not delivery.HasField("next_attempt_at")
    assert when(delivery.attempted_at) >= when(delivery.created_at)


async def test_a_receiver_failing_twice_gets_the_same_id_and_body_three_times(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    receiver: Receiver,
    tripwire: Tripwire,
) -> None:
    # A 500, then a redirect to a place that must never be contacted, then success.
    receiver.answers = [(500, {}), (302, {"Location": tripwire.url()})]
    row = await finished_request(pool, receiver.url())
    async with running(pool, redis_client, names, settings_for(receiver)) as run:
        await publish(redis_client, names, finished_event(row))
        deliveries = await deliveries_where(
            run.dispatcher,
            row.id,
            [
                S.WEBHOOK_DELIVERY_STATE_FAILED,
                S.WEBHOOK_DELIVERY_STATE_FAILED,
                S.WEBHOOK_DELIVERY_STATE_SUCCEEDED,
            ],
        )

    assert receiver.rejected == []
    assert len(receiver.received) == 3
    assert {r.headers["webhook-id"] for r in receiver.received} == {row.finished_event_id}
    assert len({r.body for r in receiver.received}) == 1
    assert tripwire.accepted == 0
    assert [d.attempt for d in deliveries] == [1, 2, 3]
    assert [d.status_code for d in deliveries] == [500, 302, 200]
    assert "answered 500" in deliveries[0].error
    assert "redirects are not followed" in deliveries[1].error
    for failed, following in itertools.pairwise(deliveries):
        # A failed attempt says when the next one is due, and the next one waits for it.
        assert when(failed.next_attempt_at) > when(failed.attempted_at)
        assert when(following.attempted_at) >= when(failed.next_attempt_at)
    assert not deliveries[-1].HasField("next_attempt_at")


async def test_410_gone_stops_delivery(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, receiver: Receiver
) -> None:
    receiver.answers = [(410, {})]
    row = await finished_request(pool, receiver.url())
    async with running(pool, redis_client, names, settings_for(receiver)) as run:
        await publish(redis_client, names, finished_event(row))
        # Recorded in the same transaction as a retry would be: one row means no retry.
        [delivery] = await deliveries_where(
            run.dispatcher, row.id, [S.WEBHOOK_DELIVERY_STATE_ABANDONED]
        )
    assert delivery.status_code == 410
    assert "410" in delivery.error and not delivery.HasField("next_attempt_at")
    assert len(receiver.received) == 1


async def test_a_spent_schedule_abandons_the_event(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, receiver: Receiver
) -> None:
    receiver.answers = [(503, {}), (429, {})]
    row = await finished_request(pool, receiver.url())
    settings = settings_for(receiver, schedule=(0.01,))
    async with running(pool, redis_client, names, settings) as run:
        await publish(redis_client, names, finished_event(row))
        deliveries = await deliveries_where(
            run.dispatcher,
            row.id,
            [S.WEBHOOK_DELIVERY_STATE_FAILED, S.WEBHOOK_DELIVERY_STATE_ABANDONED],
        )
    assert (
        "answered 429" in deliveries[1].error and "gave up after 2 attempts" in deliveries[1].error
    )
    assert len(receiver.received) == 2


async def test_retry_after_is_honoured_when_longer_than_the_schedule(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, receiver: Receiver
) -> None:
    receiver.answers = [(503, {"Retry-After": "1"})]
    row = await finished_request(pool, receiver.url())
    settings = settings_for(receiver, schedule=(0.01, 0.01, 0.01))
    async with running(pool, redis_client, names, settings) as run:
        await publish(redis_client, names, finished_event(row))
        first, second = await deliveries_where(
            run.dispatcher,
            row.id,
            [S.WEBHOOK_DELIVERY_STATE_FAILED, S.WEBHOOK_DELIVERY_STATE_SUCCEEDED],
        )
    assert (first.status_code, second.status_code) == (503, 200)
    assert "retry in 1 s" in first.error
    waited = when(first.next_attempt_at) - when(first.attempted_at)
    assert waited.total_seconds() >= 0.99
    assert when(second.attempted_at) >= when(first.next_attempt_at)


async def test_redelivery_sends_the_latest_event_again_with_its_id(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, receiver: Receiver
) -> None:
    row = await finished_request(pool, receiver.url())
    async with running(pool, redis_client, names, settings_for(receiver)) as run:
        await publish(redis_client, names, finished_event(row))
        await deliveries_where(run.dispatcher, row.id, [S.WEBHOOK_DELIVERY_STATE_SUCCEEDED])

        again = await run.dispatcher.redeliver(row)
        assert (again.event_id, again.attempt) == (row.finished_event_id, 2)
        assert again.state == S.WEBHOOK_DELIVERY_STATE_SCHEDULED
        await deliveries_where(
            run.dispatcher,
            row.id,
            [S.WEBHOOK_DELIVERY_STATE_SUCCEEDED, S.WEBHOOK_DELIVERY_STATE_SUCCEEDED],
        )

    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == row.finished_event_id
    assert first.body == second.body
    assert receiver.rejected == []


async def test_redelivery_brings_a_scheduled_retry_forward(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, receiver: Receiver
) -> None:
    receiver.answers = [(500, {})]
    row = await finished_request(pool, receiver.url())
    settings = settings_for(receiver, schedule=(3600.0,))
    async with running(pool, redis_client, names, settings) as run:
        await publish(redis_client, names, finished_event(row))
        await deliveries_where(
            run.dispatcher,
            row.id,
            [S.WEBHOOK_DELIVERY_STATE_FAILED, S.WEBHOOK_DELIVERY_STATE_SCHEDULED],
        )
        again = await run.dispatcher.redeliver(row)
        assert again.attempt == 2  # the retry waiting for its hour, now due
        await deliveries_where(
            run.dispatcher,
            row.id,
            [S.WEBHOOK_DELIVERY_STATE_FAILED, S.WEBHOOK_DELIVERY_STATE_SUCCEEDED],
        )
    assert len(receiver.received) == 2


async def test_redelivery_needs_a_final_request_with_a_webhook(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, receiver: Receiver
) -> None:
    without = await finished_request(pool, None)
    open_id = uuid.uuid4()
    async with pool.acquire() as conn:
        await queries.insert_request(
            conn, open_id, options={}, webhook_url=receiver.url(), owner="", idempotency_key=None
        )
        still_open = await queries.get_request(conn, open_id)
    assert still_open is not None
    async with running(pool, redis_client, names, settings_for(receiver)) as run:
        with pytest.raises(Conflict, match="no webhook_url"):
            await run.dispatcher.redeliver(without)
        with pytest.raises(Conflict, match="is Pending"):
            await run.dispatcher.redeliver(still_open)
        assert await run.dispatcher.list_deliveries(open_id) == []


async def test_a_blocked_address_is_abandoned_without_contacting_it(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    receiver: Receiver,
    tripwire: Tripwire,
) -> None:
    # Loopback, but not the allowed receiver: the tripwire listens where the URL points.
    literal = await finished_request(pool, tripwire.url())
    async with running(pool, redis_client, names, settings_for(receiver)) as run:
        await publish(redis_client, names, finished_event(literal))
        [delivery] = await deliveries_where(
            run.dispatcher, literal.id, [S.WEBHOOK_DELIVERY_STATE_ABANDONED]
        )
    assert delivery.error.startswith("BLOCKED_ADDRESS")
    assert delivery.status_code == 0 and not delivery.HasField("next_attempt_at")
    assert tripwire.accepted == 0 and receiver.received == []


@pytest.mark.parametrize("address", ["10.0.0.5", "127.0.0.1", "169.254.169.254"])
async def test_a_name_resolving_to_a_blocked_address_is_abandoned(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    receiver: Receiver,
    tripwire: Tripwire,
    address: str,
) -> None:
    # The port is allowed, so it is the resolved address that is refused.
    settings = settings_for(
        receiver,
        fetch_limits=FetchLimits(
            total_timeout=5.0, max_redirects=0, allowed_ports=frozenset({80, 443, tripwire.port})
        ),
    )
    row = await finished_request(pool, f"http://hooks.merchant.example:{tripwire.port}/hook")
    async with running(
        pool, redis_client, names, settings, resolver=StaticResolver(address)
    ) as run:
        await publish(redis_client, names, finished_event(row))
        [delivery] = await deliveries_where(
            run.dispatcher, row.id, [S.WEBHOOK_DELIVERY_STATE_ABANDONED]
        )
    assert delivery.error.startswith("BLOCKED_ADDRESS")
    assert "hooks.merchant.example" in delivery.error
    assert tripwire.accepted == 0


async def test_an_event_read_twice_schedules_one_delivery(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, receiver: Receiver
) -> None:
    row = await finished_request(pool, receiver.url())
    event = finished_event(row)
    await publish(redis_client, names, event)
    last = await publish(redis_client, names, event)  # republished (the outbox, a retry)
    async with running(pool, redis_client, names, settings_for(receiver)) as run:
        await wait_until_async(lambda: all_acknowledged(redis_client, names, last))
        # Both entries are acknowledged, so whatever they scheduled is in Postgres by now.
        await deliveries_where(run.dispatcher, row.id, [S.WEBHOOK_DELIVERY_STATE_SUCCEEDED])
    assert len(receiver.received) == 1


async def test_events_left_unacknowledged_are_scheduled_after_a_restart(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, receiver: Receiver
) -> None:
    mine = await finished_request(pool, receiver.url("/mine"))
    orphan = await finished_request(pool, receiver.url("/orphan"))
    await publish(redis_client, names, finished_event(mine))
    await publish(redis_client, names, finished_event(orphan))
    await redis_client.xgroup_create(names.events, GROUP, id="0")
    # Read and never acknowledged: one by this replica before it restarted (same name), one
    # by a replica that is gone for good (another name).
    await redis_client.xreadgroup(GROUP, "status-test", {names.events: ">"}, count=1)
    await redis_client.xreadgroup(GROUP, "status-gone", {names.events: ">"}, count=1)

    settings = settings_for(receiver)
    async with running(pool, redis_client, names, settings, consumer="status-test") as run:
        # Its own pending entries first; the other's are not idle long enough to take over.
        await deliveries_where(run.dispatcher, mine.id, [S.WEBHOOK_DELIVERY_STATE_SUCCEEDED])
        assert await run.dispatcher.list_deliveries(orphan.id) == []
    async with running(pool, redis_client, names, settings, claim_idle=0, quiet=False) as run:
        # Later, idle long enough (here: at once), the gone replica's entry is taken over.
        await deliveries_where(run.dispatcher, orphan.id, [S.WEBHOOK_DELIVERY_STATE_SUCCEEDED])
        pending: Any = await redis_client.xpending(names.events, GROUP)
        assert pending["pending"] == 0
    assert [r.payload["data"]["request_id"] for r in receiver.received] == [
        str(mine.id),
        str(orphan.id),
    ]


async def test_a_retry_scheduled_before_a_restart_is_sent_after_it(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, receiver: Receiver
) -> None:
    receiver.answers = [(500, {})]
    row = await finished_request(pool, receiver.url())
    settings = settings_for(receiver)
    async with running(pool, redis_client, names, settings, consumer="status-a") as first:
        # The service is told to stop while the first attempt is in flight: it finishes and
        # records that attempt, and sends nothing more.
        receiver.on_request = lambda _: first.stop.set()
        await publish(redis_client, names, finished_event(row))
        await asyncio.wait_for(first.stop.wait(), timeout=15)
    receiver.on_request = None
    stopped = await first.dispatcher.list_deliveries(row.id)
    assert [d.state for d in stopped] == [
        S.WEBHOOK_DELIVERY_STATE_FAILED,
        S.WEBHOOK_DELIVERY_STATE_SCHEDULED,
    ]
    assert len(receiver.received) == 1

    async with running(pool, redis_client, names, settings, consumer="status-b") as second:
        await deliveries_where(
            second.dispatcher,
            row.id,
            [S.WEBHOOK_DELIVERY_STATE_FAILED, S.WEBHOOK_DELIVERY_STATE_SUCCEEDED],
        )
    assert [r.headers["webhook-id"] for r in receiver.received] == [row.finished_event_id] * 2


class _TraceOfAttempts(logging.Handler):
    """The trace current where each "webhook attempt" line is logged (in the attempt's task)."""

    def __init__(self) -> None:
        super().__init__()
        self.traces: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "webhook attempt":
            trace = tracing.current_trace()
            self.traces.append(trace.trace_id if trace else "")


async def test_an_attempt_after_a_restart_continues_the_requests_trace(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upload_trace = tracing.TraceContext(uuid.uuid4().hex, uuid.uuid4().hex[:16], 1)
    receiver.answers = [(500, {})]
    row = await finished_request(pool, receiver.url(), traceparent=upload_trace.traceparent)
    settings = settings_for(receiver)
    attempts = _TraceOfAttempts()
    caplog.set_level(logging.INFO, logger="services.status.webhooks")
    logger = logging.getLogger("services.status.webhooks")
    logger.addHandler(attempts)
    try:
        async with running(pool, redis_client, names, settings, consumer="status-a") as first:
            receiver.on_request = lambda _: first.stop.set()
            # Published from another trace: the worker's work that finished the request.
            with tracing.bound(tracing.continue_trace(None)):
                await publish(redis_client, names, finished_event(row))
            await asyncio.wait_for(first.stop.wait(), timeout=15)
        receiver.on_request = None
        async with running(pool, redis_client, names, settings, consumer="status-b") as second:
            await deliveries_where(
                second.dispatcher,
                row.id,
                [S.WEBHOOK_DELIVERY_STATE_FAILED, S.WEBHOOK_DELIVERY_STATE_SUCCEEDED],
            )
    finally:
        logger.removeHandler(attempts)
    # The first replica continued the event's trace; the second never saw it, and continues
    # the request's.
    first_attempt, second_attempt = attempts.traces
    assert first_attempt and first_attempt != upload_trace.trace_id
    assert second_attempt == upload_trace.trace_id


async def test_without_a_secret_deliveries_are_abandoned(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, receiver: Receiver
) -> None:
    row = await finished_request(pool, receiver.url())
    settings = settings_for(receiver, secret="")
    async with running(pool, redis_client, names, settings, quiet=False) as run:
        await publish(redis_client, names, finished_event(row))
        [delivery] = await deliveries_where(
            run.dispatcher, row.id, [S.WEBHOOK_DELIVERY_STATE_ABANDONED]
        )
    assert delivery.error == NOT_CONFIGURED
    assert receiver.received == []


async def test_events_without_a_webhook_or_not_finished_are_acknowledged_and_skipped(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, receiver: Receiver
) -> None:
    without = await finished_request(pool, None)
    with_hook = await finished_request(pool, receiver.url())
    progress = finished_event(with_hook)
    progress.type = request_pb2.REQUEST_EVENT_TYPE_PROGRESS
    progress.event_id = ""
    await publish(redis_client, names, finished_event(without))
    await publish(redis_client, names, progress)
    last: Any = await redis_client.xadd(names.events, {EVENT_FIELD: b"\xff not protobuf"})
    async with running(pool, redis_client, names, settings_for(receiver), quiet=False) as run:
        await wait_until_async(lambda: all_acknowledged(redis_client, names, last.decode()))
        assert await run.dispatcher.list_deliveries(without.id) == []
        assert await run.dispatcher.list_deliveries(with_hook.id) == []
    assert receiver.received == []


@pytest.mark.unit
def test_retry_delay_follows_the_schedule_with_jitter_and_retry_after() -> None:
    schedule = (5.0, 300.0, 1800.0)
    for attempt, step in enumerate(schedule, start=1):
        delay = retry_delay(schedule, attempt, None, floor=60)
        assert delay is not None and 0.8 * step <= delay <= 1.2 * step
    assert retry_delay(schedule, 4, None, floor=60) is None  # spent
    assert retry_delay(schedule, 4, 10.0, floor=60) is None
    longer = retry_delay(schedule, 1, 120.0, floor=60)
    assert longer == 120.0  # the receiver's Retry-After, longer than 5 s ± 20 %
    capped = retry_delay(schedule, 1, 86400.0, floor=60)
    assert capped == 1800.0  # capped at the largest step
    shorter = retry_delay(schedule, 2, 1.0, floor=60)
    assert shorter is not None and shorter >= 240  # a shorter Retry-After changes nothing
    assert retry_delay((0.01,), 1, 1.0, floor=60) == 1.0  # tiny schedules still honour it


# ---------------------------------------------------------------- turns between owners


async def scheduled(pool: asyncpg.Pool, owner: str, count: int) -> list[int]:
    """`count` finished requests of `owner`, each with attempt 1 scheduled; their rows' ids."""
    ids = []
    for _ in range(count):
        row = await finished_request(pool, "http://127.0.0.1:9/hook", owner=owner)
        async with pool.acquire() as conn:
            assert await webhooks_db.schedule_first_attempt(
                conn,
                request_id=row.id,
                event_id=row.finished_event_id,
                event_type="request.completed",
                url="http://127.0.0.1:9/hook",
                payload="{}",
            )
            ids.append(
                await conn.fetchval(
                    "SELECT id FROM webhook_deliveries WHERE request_id = $1", row.id
                )
            )
    return ids


async def claim(pool: asyncpg.Pool, limit: int, per_owner: int) -> set[int]:
    async with pool.acquire() as conn:
        due = await webhooks_db.claim_due(conn, limit=limit, lease_seconds=60, per_owner=per_owner)
    return {d.id for d in due}


async def test_owners_take_turns_and_each_has_a_bound_in_flight(pool: asyncpg.Pool) -> None:
    busy = await scheduled(pool, "busy", 10)  # the older backlog
    quiet = await scheduled(pool, "quiet", 2)

    # Turns: each owner's oldest due attempt before anyone's second.
    assert await claim(pool, limit=2, per_owner=100) == {busy[0], quiet[0]}
    # The bound counts what is in flight already: busy has 1 of 3, quiet 1 of 3.
    assert await claim(pool, limit=100, per_owner=3) == {*busy[1:3], quiet[1]}
    # Both at their bound (busy) or done: nothing more until an attempt is recorded.
    assert await claim(pool, limit=100, per_owner=3) == set()
