"""Issue 14, finding 1 piece by piece: a busy pool, a stalled upload and a crashed one.

- a stalled upload holds no Postgres connection: another upload completes on a pool of one;
- acquiring a pooled connection waits at most its timeout, then UNAVAILABLE with Retry-After;
- the health probe has a connection of its own, so a busy pool is not "Postgres down";
- an upload lease left by a dead process expires; `uploads=` counts per key;
- a lease is given back even when its holder is cancelled while giving it back;
- a Redis or a Postgres that stops answering fails the call in a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable
from typing import Any, cast

import asyncpg
import grpc
import pytest
import redis.asyncio
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common import limits
from services.common.auth import Limits, Principal
from services.common.csv_format import CsvLimits
from services.common.db.pool import create_pool
from services.common.dependencies import DependencyMonitor, PostgresConnection
from services.common.errors import (
    BackendBusy,
    InvalidArgument,
    RateLimited,
    Unavailable,
    error_from_rpc,
)
from services.common.limits import UPLOAD_LEASE, Limiter
from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.resources import redis_client
from services.common.servicer_errors import BACKEND_ERRORS
from services.common.streams import READ_BLOCK_MS, GroupReader, StreamNames
from services.ingest.servicer import Header, IngestServicer, registrar
from services.worker.config import WorkerSettings
from testing.polling import wait_until_async
from testing.relay import postgres_relay
from testing.uploads import csv_of, upload
from tests.integration.conftest import serving

pytestmark = pytest.mark.integration

URLS = ["http://img.example/a.jpg"]


@pytest.fixture
async def pool_of_one(database_url: str, pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """A pool of one connection on the migrated database (`pool` migrates it)."""
    del pool
    pool = await create_pool(database_url, min_size=1, max_size=1, acquire_timeout=0.5)
    try:
        yield pool
    finally:
        await pool.close()


class WatchedIngest(IngestServicer):
    """Ingest that says when an upload's header has been read (the upload has begun)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.began = asyncio.Event()

    async def _header(self, messages: AsyncIterator[Any]) -> Header:
        header = await super()._header(messages)
        self.began.set()
        return header


@pytest.fixture
async def watched(
    pool_of_one: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames
) -> AsyncIterator[tuple[WatchedIngest, ingest_grpc.IngestServiceAsyncStub]]:
    servicer = WatchedIngest(pool_of_one, redis_client, names, CsvLimits())
    async with serving(registrar(servicer)) as channel:
        yield servicer, ingest_grpc.IngestServiceStub(channel)


@pytest.fixture
def ingest_on_one_connection(
    watched: tuple[WatchedIngest, ingest_grpc.IngestServiceAsyncStub],
) -> ingest_grpc.IngestServiceAsyncStub:
    return watched[1]


@contextlib.asynccontextmanager
async def stalled_upload(ingest: ingest_grpc.IngestServiceAsyncStub) -> AsyncIterator[Any]:
    """An upload that sent its header and a first chunk, then nothing."""
    call: Any = ingest.UploadCsv(None, timeout=60)
    await call.write(ingest_pb.UploadCsvRequest(header=ingest_pb.UploadHeader()))
    await call.write(ingest_pb.UploadCsvRequest(chunk=csv_of([("1", "Shoe", URLS)])))
    try:
        yield call
    finally:
        call.cancel()


async def test_a_stalled_upload_holds_no_connection(
    watched: tuple[WatchedIngest, ingest_grpc.IngestServiceAsyncStub], pool_of_one: asyncpg.Pool
) -> None:
    servicer, ingest = watched
    async with stalled_upload(ingest):
        async with asyncio.timeout(30):
            await servicer.began.wait()
        # Had the stalled upload taken the pool's only connection, this one would wait for it
        # (UNAVAILABLE after the pool's acquire timeout).
        accepted = await upload(ingest, csv_of([("1", "Hat", URLS)]))
        assert accepted.created


async def test_a_busy_pool_answers_unavailable_with_retry_after(
    ingest_on_one_connection: ingest_grpc.IngestServiceAsyncStub, pool_of_one: asyncpg.Pool
) -> None:
    async with pool_of_one.acquire():
        with pytest.raises(BackendBusy, match=r"IMGPIPE_DB_ACQUIRE_TIMEOUT=0\.5s"):
            await pool_of_one.fetchval("SELECT 1")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await upload(ingest_on_one_connection, csv_of([("1", "Hat", URLS)]))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    error = error_from_rpc(caught.value)
    assert isinstance(error, Unavailable)
    assert error.http_status == 503
    assert error.http_headers() == {"Retry-After": "1"}
    # Free again: the next call is served.
    assert (await upload(ingest_on_one_connection, csv_of([("1", "Hat", URLS)]))).created


async def test_the_health_probe_does_not_wait_for_the_pool(
    pool_of_one: asyncpg.Pool, database_url: str
) -> None:
    name = f"imgpipe-status-probe-{secrets.token_hex(3)}"
    connection = PostgresConnection(database_url, name)
    monitor = DependencyMonitor({"postgres": connection.probe})
    try:
        async with pool_of_one.acquire():
            assert await monitor.check() == []
        # A connection apart from the pool's, named as such in pg_stat_activity.
        named = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        assert await pool_of_one.fetchval(named, name) == 1
        # A broken connection is replaced at the next probe.
        await connection.close()
        assert await monitor.check() == []
    finally:
        await connection.close()
    # Nothing listens on port 1 of the loopback: that database is down.
    down = PostgresConnection("postgresql://imgpipe@127.0.0.1:1/imgpipe")
    assert await DependencyMonitor({"postgres": down.probe}).check() == ["postgres"]


def principal(uploads: int) -> Principal:
    return Principal(f"uploader-{secrets.token_hex(3)}", Limits(uploads=uploads))


async def test_uploads_in_progress_are_counted_per_key(
    redis_client: redis.asyncio.Redis, names: StreamNames, pool: asyncpg.Pool
) -> None:
    limiter = Limiter(redis_client, names, pool)
    one, other = principal(2), principal(2)
    async with limiter.upload_lease(one), limiter.upload_lease(one):
        with pytest.raises(RateLimited) as caught:
            async with limiter.upload_lease(one):
                pass
        assert caught.value.details[0].column == "uploads"
        assert caught.value.retry_after >= 1
        async with limiter.upload_lease(other):
            pass  # another key has slots of its own
    async with limiter.upload_lease(one):
        pass  # given back at the end of each upload
    async with limiter.upload_lease(principal(0)), limiter.upload_lease(principal(0)):
        pass  # uploads=0: no limit


async def test_a_lease_left_by_a_dead_process_expires(
    redis_client: redis.asyncio.Redis, names: StreamNames, pool: asyncpg.Pool
) -> None:
    limiter = Limiter(redis_client, names, pool)
    one = principal(1)
    key = f"{names.prefix}:limits:uploads:{one.name}"
    now, _ = await redis_client.time()
    # What a process that died mid-upload leaves behind: a lease nobody renews.
    await redis_client.zadd(key, {"dead-upload": int(now) + UPLOAD_LEASE})
    with pytest.raises(RateLimited):
        async with limiter.upload_lease(one):
            pass
    await redis_client.zadd(key, {"dead-upload": int(now) - 1})  # ... once its lease is over
    async with limiter.upload_lease(one):
        assert await redis_client.zcard(key) == 1


async def lease_expiry(client: redis.asyncio.Redis, key: str) -> float:
    """The expiry of the one lease under `key`."""
    held: list[Any] = await client.zrange(key, 0, -1, withscores=True)
    [(_, expiry)] = held
    return float(expiry)


async def test_an_upload_renews_its_lease_while_it_lasts(
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    pool: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "UPLOAD_LEASE", 3)  # renewed every second
    limiter = Limiter(redis_client, names, pool)
    one = principal(1)
    key = f"{names.prefix}:limits:uploads:{one.name}"
    async with limiter.upload_lease(one):
        first = await lease_expiry(redis_client, key)

        async def renewed() -> bool:
            return await lease_expiry(redis_client, key) > first

        await wait_until_async(renewed, timeout=15, interval=0.2, message="the lease renewed")
    assert await redis_client.zcard(key) == 0


class GivingBackWaits(redis.asyncio.Redis):
    """A real Redis client whose ZREM (a lease given back) waits until the test lets it go."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.giving_back = asyncio.Event()
        self.go_on = asyncio.Event()

    async def zrem(self, name: Any, *values: Any) -> Any:
        self.giving_back.set()
        await self.go_on.wait()
        return await super().zrem(name, *values)


@pytest.mark.parametrize("lease", ["uploads", "streams"])
async def test_a_lease_is_given_back_when_its_holder_is_cancelled_while_giving_it_back(
    redis_server_url: str, names: StreamNames, pool: asyncpg.Pool, lease: str
) -> None:
    """What a stalled upload whose client went away used to leave behind (one time in about
    150 here): the upload ends, and while its `finally` gives the lease back, grpc.aio cancels
    the handler because the gateway cancelled the call. The key's slot stayed taken until the
    lease expired, and its next upload was refused for a minute."""
    client = cast(GivingBackWaits, GivingBackWaits.from_url(redis_server_url))
    try:
        limiter = Limiter(client, names, pool)
        one = Principal(f"uploader-{secrets.token_hex(3)}", Limits(uploads=1, streams=1))
        key = f"{names.prefix}:limits:{lease}:{one.name}"
        held = limiter.upload_lease(one) if lease == "uploads" else limiter.hold_stream(one)

        async def upload_whose_client_went_away() -> None:
            async with held:
                raise InvalidArgument("the upload ended without UploadEnd; nothing was stored")

        handler = asyncio.create_task(upload_whose_client_went_away())
        async with asyncio.timeout(10):
            await client.giving_back.wait()
        assert await client.zcard(key) == 1
        handler.cancel()  # grpc.aio: the client cancelled the call
        with pytest.raises(asyncio.CancelledError):
            await handler
        client.go_on.set()

        async def given_back() -> bool:
            return await client.zcard(key) == 0

        await wait_until_async(given_back, timeout=10, message="the lease given back")
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A port on 127.0.0.1 that accepts connections, reads what comes and never answers: a
    Redis that stopped answering without closing its connections (a partition, a stall)."""
    received = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(writer)
        while await reader.read(4096):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in received:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_redis_that_stops_answering_fails_the_call_instead_of_holding_it() -> None:
    async with silent_server() as port:
        client = redis_client(f"redis://127.0.0.1:{port}/0", timeout=0.5)
        try:
            with pytest.raises(RedisTimeoutError) as caught:
                # Bounded here too: without the client's timeout this would never return.
                await asyncio.wait_for(client.xadd("imgpipe:tasks", {"task": b"x"}), 30)
        finally:
            await client.aclose()
    assert isinstance(caught.value, BACKEND_ERRORS)  # retried as an outage, not a bug


async def test_a_blocking_read_still_returns_empty_under_the_default_timeout(
    redis_server_url: str, names: StreamNames
) -> None:
    """A worker's read blocks for READ_BLOCK_MS on an empty stream: under the services' default
    timeout it returns empty, as before."""
    timeout = WorkerSettings.from_env(
        {"IMGPIPE_DATABASE_URL": "postgresql://x/y", "IMGPIPE_REDIS_URL": redis_server_url}
    ).common.redis_timeout
    client = redis_client(redis_server_url, timeout)
    try:
        reader = GroupReader(client, names.tasks, "workers", "worker-1")
        await reader.ensure_group()
        assert await reader.read(1, READ_BLOCK_MS) == []
    finally:
        await client.aclose()


async def test_a_postgres_that_stops_answering_fails_the_call_and_the_pool_recovers(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """A Postgres that stops answering without closing its connections (a partition, a stall)
    held a statement for as long as TCP took to give up. With IMGPIPE_DB_COMMAND_TIMEOUT, the
    statement fails as a backend error in that time; a call that needs a new connection gets
    UNAVAILABLE after IMGPIPE_DB_ACQUIRE_TIMEOUT; once Postgres answers again, the pool serves
    statements again."""
    del pool  # migrated the database
    async with postgres_relay(database_url) as (relay, through):
        frozen = await create_pool(
            through, min_size=1, max_size=2, acquire_timeout=0.5, command_timeout=0.5
        )
        try:
            assert await frozen.fetchval("SELECT 1") == 1
            relay.freeze()
            statement = await outcome(frozen.fetchval("SELECT 2"))
            assert isinstance(statement, TimeoutError)
            assert isinstance(statement, BACKEND_ERRORS)  # retried as an outage
            # Its connection was closed; the next call waits for a new one, which is not made.
            assert isinstance(await outcome(frozen.fetchval("SELECT 3")), BackendBusy)
            relay.thaw()

            async def answers() -> bool:
                try:
                    return bool(await frozen.fetchval("SELECT 4") == 4)
                except (TimeoutError, BackendBusy):
                    return False

            await wait_until_async(answers, timeout=30, message="the pool to serve again")
        finally:
            relay.thaw()
            await frozen.close()


async def outcome(call: Awaitable[Any]) -> BaseException:
    """What `call` raised; the test fails if it did not end within 30 s (without the
    timeouts, a call to a Postgres that does not answer ends only when TCP gives up)."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=30)
    if not done:
        task.cancel()
    assert done, "still waiting for a Postgres that does not answer"
    error = task.exception()
    assert error is not None, "a Postgres that does not answer answered"
    return error
