"""API keys and per-key limits at the gRPC services: ingest and status on real gRPC servers with
the ApiKeyInterceptor, real Postgres and Redis, and a real worker where a request must finish.

The REST side (401 with WWW-Authenticate, 404 across keys, 429 with Retry-After, the sign-in
cookie) is tested against the whole stack in tests/e2e/test_auth.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.common.auth import KeyRing, key_hash, new_key, parse_api_keys
from services.common.auth import Limits as KeyLimits
from services.common.csv_format import CsvLimits
from services.common.db import queries
from services.common.errors import RateLimited, TooLarge, error_from_rpc
from services.common.fetch import FetchAllow, FetchLimits, make_session
from services.common.grpc_auth import ApiKeyInterceptor
from services.common.limits import STALE_RESERVATION, Limiter
from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.common.pb.imgpipe.v1 import task_pb2
from services.common.storage import Storage
from services.common.streams import TASK_FIELD, StreamNames, TaskConsumer
from services.ingest.feeder import Feeder
from services.ingest.servicer import IngestServicer
from services.ingest.servicer import registrar as ingest_registrar
from services.status.config import WebhookSettings
from services.status.progress import ProgressHub
from services.status.servicer import StatusServicer
from services.status.servicer import registrar as status_registrar
from services.status.webhooks import WebhookDispatcher
from services.worker.processor import Processor
from services.worker.runner import ConsumePolicy, consume
from testing.origin import ImageOrigin
from testing.polling import wait_until_async
from testing.uploads import csv_of
from testing.uploads import upload as upload_csv

pytestmark = pytest.mark.integration

ACME, GLOBEX, SLOW, DAILY = new_key(), new_key(), new_key(), new_key()
# Limits of their own for the tests that need them; the others have no rate limit, so the
# number of calls a test makes never matters. Owner names get a suffix per test: the tests
# share one database.
KEYS = (
    f"acme{{tag}}:{key_hash(ACME)} rate=0 concurrent=2,"
    f"globex{{tag}}:{key_hash(GLOBEX)} rate=0,"
    f"slow{{tag}}:{key_hash(SLOW)} rate=1/min burst=2,"
    f"daily{{tag}}:{key_hash(DAILY)} rate=0 concurrent=0 images_per_day=5"
)
CSV_LIMITS = CsvLimits(max_bytes=4096, max_rows=3, max_urls_per_row=2, max_urls_total=5)
IMAGE = "https://example.com/a.jpg"


def key_ring(tag: str) -> KeyRing:
    keys, problems = parse_api_keys(KEYS.format(tag=tag), KeyLimits())
    assert problems == []
    return keys


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@dataclass
class Services:
    ingest: ingest_grpc.IngestServiceAsyncStub
    status: status_grpc.StatusServiceAsyncStub
    health: Any  # a HealthStub: typeshed lists none of its methods
    pool: asyncpg.Pool
    redis: redis.asyncio.Redis
    names: StreamNames
    tag: str  # the suffix of this test's owner names

    async def owners(self) -> dict[str, int]:
        """How many requests each of this test's owners has (by short name)."""
        rows = await self.pool.fetch(
            "SELECT owner, count(*) AS n FROM requests WHERE owner LIKE $1 GROUP BY owner",
            f"%{self.tag}",
        )
        return {r["owner"].removesuffix(self.tag): r["n"] for r in rows}


@contextlib.asynccontextmanager
async def serving_with_keys(
    keys: KeyRing, limiter: Limiter, register: Sequence[Callable[[grpc.aio.Server], None]]
) -> AsyncIterator[grpc.aio.Channel]:
    """One gRPC server on 127.0.0.1 with the API-key interceptor, as run_service builds it."""
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(keys, limiter.check_rate)])
    for each in register:
        each(server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close(None)
        await server.stop(None)


@contextlib.asynccontextmanager
async def serving(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    storage: Storage,
    hub: ProgressHub,
    feeder: Feeder,
) -> AsyncIterator[Services]:
    """Ingest and status behind the API-key interceptor, their limiter on `redis_client`."""
    limiter = Limiter(redis_client, names, pool)
    session = make_session(FetchAllow(), FetchLimits())
    webhooks = WebhookDispatcher(
        pool=pool,
        redis=redis_client,
        names=names,
        session=session,
        settings=WebhookSettings(),
    )
    ingest = IngestServicer(pool, redis_client, names, CSV_LIMITS, limiter, wake_feeder=feeder.wake)
    status = StatusServicer(pool, storage, redis_client, names, webhooks, hub)
    tag = f"-{secrets.token_hex(3)}"
    try:
        async with serving_with_keys(
            key_ring(tag), limiter, [ingest_registrar(ingest), status_registrar(status)]
        ) as channel:
            yield Services(
                ingest=ingest_grpc.IngestServiceStub(channel),
                status=status_grpc.StatusServiceStub(channel),
                health=health_pb2_grpc.HealthStub(channel),
                pool=pool,
                redis=redis_client,
                names=names,
                tag=tag,
            )
    finally:
        await session.close()


@pytest.fixture
async def services(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    storage: Storage,
    hub: ProgressHub,
    feeder: Feeder,
) -> AsyncIterator[Services]:
    async with serving(pool, redis_client, names, storage, hub, feeder) as services:
        yield services


async def upload(
    services: Services, key: str | None, body: bytes, idempotency_key: str = ""
) -> ingest_pb.Accepted:
    """UploadCsv of `body` in one chunk, with the API key `key` (None: no key)."""
    return await upload_csv(
        services.ingest,
        body,
        idempotency_key=idempotency_key,
        chunk_size=max(1, len(body)),
        api_key=key or "",
    )


async def refused(call: Callable[[], Awaitable[Any]]) -> grpc.aio.AioRpcError:
    """The gRPC error that `call()` ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call()
    return caught.value


async def first(stream: Any) -> Any:
    """The first message of a server stream (where its error arrives)."""
    return await anext(aiter(stream))


def one_image(serial: str = "1") -> bytes:
    return csv_of([(serial, "Shoe", [IMAGE])])


# ---------------------------------------------------------------- authentication


async def test_every_call_needs_a_valid_key_but_health(services: Services) -> None:
    some_id = str(uuid.uuid4())
    calls: list[Callable[[Sequence[tuple[str, str]] | None], Awaitable[Any]]] = [
        lambda md: services.status.GetRequest(
            status_pb.GetRequestRequest(request_id=some_id), metadata=md, timeout=10
        ),
        lambda md: services.status.ListProducts(
            status_pb.ListProductsRequest(request_id=some_id), metadata=md, timeout=10
        ),
        lambda md: first(
            services.status.WatchRequest(
                status_pb.WatchRequestRequest(request_id=some_id), metadata=md, timeout=10
            )
        ),
        lambda md: services.status.GetQueueStats(
            status_pb.GetQueueStatsRequest(), metadata=md, timeout=10
        ),
        lambda md: services.ingest.RetryFailedImages(
            ingest_pb.RetryFailedImagesRequest(request_id=some_id), metadata=md, timeout=10
        ),
    ]
    for call in calls:
        for metadata, message in (
            (None, "an API key is required"),
            (bearer("imgpipe_not-a-key"), "the API key is not valid"),
            ((("authorization", f"Basic {ACME}"),), "an API key is required"),
            (bearer(key_hash(ACME)), "the API key is not valid"),
        ):
            error = await refused(functools.partial(call, metadata))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert message in (error.details() or "")
    for key in (None, "imgpipe_wrong"):
        error = await refused(functools.partial(upload, services, key, one_image()))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await services.owners() == {}

    # Probes and tools need no key.
    answer = await services.health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_request_is_its_owners_alone(services: Services) -> None:
    accepted = await upload(services, ACME, csv_of([("1", "Shoe", [IMAGE]), ("2", "Hat", [IMAGE])]))
    request_id = accepted.request_id
    row = await services.pool.fetchrow(
        "SELECT owner FROM requests WHERE id = $1", uuid.UUID(request_id)
    )
    assert row is not None and row["owner"] == f"acme{services.tag}"

    got = await services.status.GetRequest(
        status_pb.GetRequestRequest(request_id=request_id), metadata=bearer(ACME), timeout=10
    )
    assert got.request.request_id == request_id
    page = await services.status.ListProducts(
        status_pb.ListProductsRequest(request_id=request_id), metadata=bearer(ACME), timeout=10
    )
    assert [p.serial_number for p in page.products] == ["1", "2"]
    watch = services.status.WatchRequest(
        status_pb.WatchRequestRequest(request_id=request_id), metadata=bearer(ACME), timeout=10
    )
    assert (await anext(aiter(watch))).request.request_id == request_id
    watch.cancel()
    deliveries = await services.status.ListWebhookDeliveries(
        status_pb.ListWebhookDeliveriesRequest(request_id=request_id),
        metadata=bearer(ACME),
        timeout=10,
    )
    assert list(deliveries.deliveries) == []

    # To another key it is exactly what an id that does not exist is.
    missing = str(uuid.uuid4())
    calls: list[Callable[[str], Awaitable[Any]]] = [
        lambda rid: services.status.GetRequest(
            status_pb.GetRequestRequest(request_id=rid), metadata=bearer(GLOBEX), timeout=10
        ),
        lambda rid: services.status.ListProducts(
            status_pb.ListProductsRequest(request_id=rid), metadata=bearer(GLOBEX), timeout=10
        ),
        lambda rid: first(
            services.status.WatchRequest(
                status_pb.WatchRequestRequest(request_id=rid), metadata=bearer(GLOBEX), timeout=10
            )
        ),
        lambda rid: services.status.ListWebhookDeliveries(
            status_pb.ListWebhookDeliveriesRequest(request_id=rid),
            metadata=bearer(GLOBEX),
            timeout=10,
        ),
        lambda rid: services.status.RedeliverWebhook(
            status_pb.RedeliverWebhookRequest(request_id=rid), metadata=bearer(GLOBEX), timeout=10
        ),
        lambda rid: services.ingest.RetryFailedImages(
            ingest_pb.RetryFailedImagesRequest(request_id=rid), metadata=bearer(GLOBEX), timeout=10
        ),
    ]
    for call in calls:
        theirs = await refused(functools.partial(call, request_id))
        absent = await refused(functools.partial(call, missing))
        assert theirs.code() == absent.code() == grpc.StatusCode.NOT_FOUND
        assert theirs.details() == f"no request {request_id}"
        assert absent.details() == f"no request {missing}"

    # The retry of the other key changed nothing.
    retried = await services.ingest.RetryFailedImages(
        ingest_pb.RetryFailedImagesRequest(request_id=request_id), metadata=bearer(ACME), timeout=10
    )
    assert retried.images_retried == 0


async def test_calls_at_once_each_see_their_own_caller(services: Services) -> None:
    request_id = (await upload(services, ACME, one_image())).request_id

    async def outcome(key: str) -> tuple[str, grpc.StatusCode]:
        try:
            await services.status.ListProducts(
                status_pb.ListProductsRequest(request_id=request_id),
                metadata=bearer(key),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            return key, exc.code()
        return key, grpc.StatusCode.OK

    keys = [ACME, GLOBEX] * 25
    outcomes = await asyncio.gather(*(outcome(key) for key in keys))
    expected = {ACME: grpc.StatusCode.OK, GLOBEX: grpc.StatusCode.NOT_FOUND}
    assert [code for _, code in outcomes] == [expected[key] for key in keys]


async def test_idempotency_keys_belong_to_their_owner(services: Services) -> None:
    body = one_image()
    mine = await upload(services, ACME, body, idempotency_key="order-7")
    theirs = await upload(services, GLOBEX, body, idempotency_key="order-7")
    again = await upload(services, ACME, body, idempotency_key="order-7")
    assert mine.created and theirs.created and not again.created
    assert mine.request_id != theirs.request_id
    assert again.request_id == mine.request_id
    assert await services.owners() == {"acme": 1, "globex": 1}


async def test_the_queue_names_only_the_callers_own_backlog(services: Services) -> None:
    await upload(services, ACME, one_image())
    await upload(services, GLOBEX, one_image())

    async def owners(key: str) -> list[status_pb.OwnerBacklog]:
        stats = await services.status.GetQueueStats(
            status_pb.GetQueueStatsRequest(), metadata=bearer(key), timeout=10
        )
        return list(stats.owners)

    for key, name in ((ACME, f"acme{services.tag}"), (GLOBEX, f"globex{services.tag}")):
        seen = await owners(key)
        [mine] = [o for o in seen if o.yours]
        assert (mine.owner, mine.requests, mine.waiting_images + mine.released_images) == (
            name,
            1,
            1,
        )
        # The other owner is there as counts, without its name (the tests share a database,
        # so earlier tests' owners may be there too, just as anonymous).
        others = [o for o in seen if not o.yours]
        assert others and all(o.owner == "" for o in others)


async def test_dead_letters_are_shown_to_their_owner_only(services: Services) -> None:
    accepted = await upload(services, ACME, one_image())
    task = task_pb2.ImageTask(request_id=accepted.request_id, image_id=1, input_url=IMAGE)
    await services.redis.xadd(
        services.names.dead, {TASK_FIELD: task.SerializeToString(), b"error_code": b"TIMEOUT"}
    )

    async def dead_letters(key: str) -> status_pb.GetQueueStatsResponse:
        return await services.status.GetQueueStats(
            status_pb.GetQueueStatsRequest(dead_letter_limit=10), metadata=bearer(key), timeout=10
        )

    mine, theirs = await dead_letters(ACME), await dead_letters(GLOBEX)
    assert [d.request_id for d in mine.dead_letters] == [accepted.request_id]
    assert list(theirs.dead_letters) == []
    # The counts are the operators' view of the whole queue.
    assert mine.dead_letter_length == theirs.dead_letter_length == 1


# ---------------------------------------------------------------- limits


async def test_the_rate_limit_is_resource_exhausted_with_retry_info(services: Services) -> None:
    async def get() -> status_pb.GetQueueStatsResponse:
        return await services.status.GetQueueStats(
            status_pb.GetQueueStatsRequest(), metadata=bearer(SLOW), timeout=10
        )

    await get()
    await get()  # the burst is 2
    error = await refused(get)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate=1/min burst=2" in (error.details() or "")
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    retry = error_details_pb2.RetryInfo()
    quota = error_details_pb2.QuotaFailure()
    for packed in status.details:
        if packed.Is(retry.DESCRIPTOR):
            packed.Unpack(retry)
        if packed.Is(quota.DESCRIPTOR):
            packed.Unpack(quota)
    # One call a minute: the next one is allowed about 60 s after the first.
    assert 1 <= retry.retry_delay.seconds <= 60
    assert [v.subject for v in quota.violations] == ["rate"]
    mapped = error_from_rpc(error)
    assert isinstance(mapped, RateLimited)
    assert mapped.http_status == 429
    assert mapped.http_headers() == {"Retry-After": str(retry.retry_delay.seconds)}
    assert [d.column for d in mapped.details] == ["rate"]

    # Uploads count too; other keys have budgets of their own.
    # The limit refuses the call before ingest reads a message. A client still writing when the
    # refusal arrives may see INTERNAL instead of it (grpc/grpc#36066, the aio client's failed
    # write overwrites the server's status), so this call writes nothing and only waits.
    error = await refused(
        lambda: services.ingest.UploadCsv(None, metadata=bearer(SLOW), timeout=10)
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await upload(services, GLOBEX, one_image())


@contextlib.asynccontextmanager
async def running_worker(consumer: TaskConsumer, processor: Processor) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(consume(consumer, processor, ConsumePolicy(concurrency=4), stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_concurrent_unfinished_requests_are_limited_until_they_finish(
    services: Services, consumer: TaskConsumer, processor: Processor, origin: ImageOrigin
) -> None:
    def body(serial: str) -> bytes:
        return csv_of([(serial, "Shoe", [origin.url("/img/a.jpg")])])

    # A refused upload gives its slot back at once.
    bad = await refused(lambda: upload(services, ACME, b"S. No.,Product Name\n1,Shoe\n"))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    # No worker runs yet: both requests stay Pending.
    first = await upload(services, ACME, body("1"))
    second = await upload(services, ACME, body("2"))
    error = await refused(lambda: upload(services, ACME, body("3")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "concurrent=2" in (error.details() or "")
    mapped = error_from_rpc(error)
    assert isinstance(mapped, RateLimited) and mapped.retry_after >= 1
    assert [d.column for d in mapped.details] == ["concurrent"]
    assert await services.owners() == {"acme": 2}
    # Another key is not held back by acme's requests.
    await upload(services, GLOBEX, body("1"))

    async with running_worker(consumer, processor):

        async def both_final() -> bool:
            rows = await services.pool.fetch(
                "SELECT status FROM requests WHERE id = ANY($1::uuid[])",
                [uuid.UUID(first.request_id), uuid.UUID(second.request_id)],
            )
            return all(r["status"] in ("Completed", "Failed") for r in rows)

        await wait_until_async(both_final, timeout=30, message="acme's requests final")
    third = await upload(services, ACME, body("3"))
    assert third.created


async def test_a_slot_left_by_a_crashed_upload_is_freed_once_stale(services: Services) -> None:
    slots = f"{services.names.prefix}:limits:unfinished:acme{services.tag}"
    seconds, _ = await services.redis.time()
    # Slots taken by uploads that died before their commit: one long ago, one just now.
    await services.redis.zadd(slots, {str(uuid.uuid4()): seconds - STALE_RESERVATION - 1})
    await services.redis.zadd(slots, {str(uuid.uuid4()): seconds})
    await upload(services, ACME, one_image())  # takes the free slot... after the stale one
    error = await refused(lambda: upload(services, ACME, one_image("2")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await services.redis.zcard(slots) == 2


async def test_images_per_day_are_limited_per_utc_day(services: Services) -> None:
    three = csv_of([("1", "Shoe", [IMAGE, IMAGE]), ("2", "Hat", [IMAGE])])
    await upload(services, DAILY, three)
    error = await refused(lambda: upload(services, DAILY, three))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "images_per_day=5" in (error.details() or "")
    assert "3 images accepted today" in (error.details() or "")
    mapped = error_from_rpc(error)
    assert isinstance(mapped, RateLimited)
    assert 1 <= mapped.retry_after <= 86_400  # until the next UTC midnight
    assert [d.column for d in mapped.details] == ["images_per_day"]

    # Refused uploads, valid or not, take nothing: exactly the 2 images left still fit.
    bad = await refused(lambda: upload(services, DAILY, b"S. No.,Product Name\n1,Shoe\n"))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    await upload(services, DAILY, csv_of([("1", "Shoe", [IMAGE, IMAGE])]))
    error = await refused(lambda: upload(services, DAILY, one_image()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await services.owners() == {"daily": 2}


class ChargingImagesWaits(redis.asyncio.Redis):
    """A real Redis client whose charge of images_per_day waits until the test lets it go."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.charging = asyncio.Event()
        self.go_on = asyncio.Event()
        self.go_on.set()

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        if any(":limits:images:" in str(key) for key in keys_and_args[:numkeys]):
            self.charging.set()
            await self.go_on.wait()
        return await super().evalsha(sha, numkeys, *keys_and_args)


async def test_a_retry_holds_no_row_while_redis_charges_its_images(
    pool: asyncpg.Pool,
    redis_server_url: str,
    names: StreamNames,
    storage: Storage,
    hub: ProgressHub,
    feeder: Feeder,
) -> None:
    """A retry's charge to images_per_day is a Redis call (up to IMGPIPE_REDIS_TIMEOUT): made
    inside the retry's transaction, it held the request's row and its failed images' rows for
    that long, and workers recording the request's other images waited with it. Charged
    before, for the images Failed then, it is charged again when more fail meanwhile."""
    client = ChargingImagesWaits.from_url(redis_server_url)
    assert isinstance(client, ChargingImagesWaits)
    try:
        async with serving(pool, client, names, storage, hub, feeder) as services:
            two = [IMAGE, IMAGE.replace("a.jpg", "b.jpg")]  # two sources: no dedup follower
            accepted = await upload(services, DAILY, csv_of([("1", "Shoe", two)]))
            request_id = uuid.UUID(accepted.request_id)
            first, second = [
                r["id"]
                for r in await pool.fetch(
                    "SELECT id FROM images WHERE request_id = $1 ORDER BY id", request_id
                )
            ]
            async with pool.acquire() as conn:
                await queries.record_image_failed(conn, first, code="HTTP_ERROR", message="404")
            client.go_on.clear()
            client.charging.clear()
            retry = asyncio.ensure_future(
                services.ingest.RetryFailedImages(
                    ingest_pb.RetryFailedImagesRequest(request_id=str(request_id)),
                    metadata=bearer(DAILY),
                    timeout=30,
                )
            )

            async def charging() -> bool:
                return client.charging.is_set()

            await wait_until_async(charging, message="the retry to charge its images")
            # While Redis has not answered, every row of the request is free to take: a
            # worker fails the other image meanwhile.
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '2s'")
                await conn.execute("SELECT 1 FROM requests WHERE id = $1 FOR UPDATE", request_id)
                await conn.execute(
                    "SELECT 1 FROM images WHERE request_id = $1 FOR UPDATE", request_id
                )
                await queries.record_image_failed(conn, second, code="HTTP_ERROR", message="404")
            client.go_on.set()
            assert (await retry).images_retried == 2
            # Charged for both: 2 + 2 of the 5 a day, so one more image fits and two do not.
            error = await refused(
                lambda: upload(services, DAILY, csv_of([("1", "Shoe", [IMAGE, IMAGE])]))
            )
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "4 images accepted today" in (error.details() or "")
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("body", "message", "row", "column"),
    [
        (
            csv_of([(str(i), "Shoe", [IMAGE]) for i in range(1, 5)]),
            "the CSV exceeds IMGPIPE_MAX_ROWS=3 rows",
            5,
            "",
        ),
        (
            csv_of([("1", "Shoe", [IMAGE] * 3)]),
            "the CSV exceeds IMGPIPE_MAX_URLS_PER_ROW=2 image URLs in one row",
            2,
            "Input Image Urls",
        ),
        (
            csv_of(
                [("1", "Shoe", [IMAGE] * 2), ("2", "Hat", [IMAGE] * 2), ("3", "Cap", [IMAGE] * 2)]
            ),
            "the CSV exceeds IMGPIPE_MAX_URLS_TOTAL=5 image URLs",
            4,
            "",
        ),
        (
            csv_of([("1", "Shoe" * 2000, [IMAGE])]),
            "the CSV exceeds IMGPIPE_MAX_UPLOAD_BYTES=4096 bytes",
            2,
            "",
        ),
    ],
)
async def test_size_limits_are_too_large_naming_the_setting(
    services: Services, body: bytes, message: str, row: int, column: str
) -> None:
    error = await refused(lambda: upload(services, ACME, body))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == message
    mapped = error_from_rpc(error)
    assert isinstance(mapped, TooLarge)
    assert (mapped.http_status, mapped.message) == (413, message)
    assert [(d.row, d.column) for d in mapped.details] == [(row, column)]
    # Nothing was stored, and no slot is left behind (acme may have 2).
    assert await services.owners() == {}
    await upload(services, ACME, one_image("1"))
    await upload(services, ACME, one_image("2"))
