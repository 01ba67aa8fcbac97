"""Fixtures for in-process integration tests: migrated Postgres, Redis streams under a
per-test prefix, a file:// store, servicers on real gRPC servers, and an image origin."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest
import redis.asyncio

from services.common.csv_format import CsvLimits
from services.common.db.pool import migrate
from services.common.fetch import FetchAllow, FetchLimits, fetch_image, make_session
from services.common.image_options import ImageLimits
from services.common.outcome import RetryPolicy
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.common.storage import Storage
from services.common.streams import StreamNames, TaskConsumer
from services.ingest.feeder import Feeder
from services.ingest.servicer import IngestServicer, registrar
from services.status.progress import ProgressHub
from services.status.servicer import StatusServicer
from services.status.servicer import registrar as status_registrar
from services.worker.processor import Processor
from testing.grpc_servers import on_loopback
from testing.origin import ImageOrigin, serve_images


@pytest.fixture
async def pool(db_pool: asyncpg.Pool) -> asyncpg.Pool:
    await migrate(db_pool)
    return db_pool


@pytest.fixture
def names(redis_prefix: str) -> StreamNames:
    """A prefix of this test's own, inside the session's prefix (deleted at session end)."""
    return StreamNames(f"{redis_prefix}:{secrets.token_hex(4)}")


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage.from_url((tmp_path / "store").as_uri(), "http://127.0.0.1:8080/files/")


@pytest.fixture
async def origin() -> AsyncIterator[ImageOrigin]:
    async with serve_images((640, 480)) as served:
        yield served


@pytest.fixture
async def http_session(origin: ImageOrigin) -> AsyncIterator[aiohttp.ClientSession]:
    session = make_session(FetchAllow.parse(f"127.0.0.1:{origin.port}"), FetchLimits())
    try:
        yield session
    finally:
        await session.close()


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


@pytest.fixture
def processor(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    storage: Storage,
    http_session: aiohttp.ClientSession,
    executor: ThreadPoolExecutor,
) -> Processor:
    fetch = functools.partial(fetch_image, http_session, limits=FetchLimits())
    return Processor(
        pool=pool,
        redis=redis_client,
        names=names,
        storage=storage,
        fetch=fetch,
        executor=executor,
        image_limits=ImageLimits(),
        retry=RetryPolicy(max_attempts=2, base_delay=0.01),
    )


@pytest.fixture
def consumer(redis_client: redis.asyncio.Redis, names: StreamNames) -> TaskConsumer:
    return TaskConsumer(redis_client, names, "test-consumer")


@contextlib.asynccontextmanager
async def serving(register: Callable[[grpc.aio.Server], None]) -> AsyncIterator[grpc.aio.Channel]:
    """A gRPC server on 127.0.0.1 with the servicer `register` adds, and a channel to it."""
    async with on_loopback(register) as address:
        channel = grpc.aio.insecure_channel(address)
        try:
            yield channel
        finally:
            await channel.close(None)


# The session's database is shared by its tests, so images they left released and unfinished
# are still in the window, and may look undelivered to this test's stream: the tests' feeder
# has room to spare in both.
TEST_WINDOW = 1_000_000


@pytest.fixture
async def feeder(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames
) -> AsyncIterator[Feeder]:
    """The scheduler's feeder, running for the test and releasing onto the test's own stream.
    Images earlier tests left waiting are set aside first (marked released), so only this
    test's images are fed."""
    await pool.execute(
        "UPDATE images SET enqueued_at = now() WHERE status = 'Pending' AND enqueued_at IS NULL"
    )
    feeder = Feeder(
        pool=pool,
        redis=redis_client,
        names=names,
        window=TEST_WINDOW,
        lookahead=TEST_WINDOW,
        poll=0.05,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(feeder.run(stop))
    try:
        yield feeder
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=10)


@pytest.fixture
async def ingest_stub(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, feeder: Feeder
) -> AsyncIterator[ingest_grpc.IngestServiceAsyncStub]:
    servicer = IngestServicer(
        pool, redis_client, names, CsvLimits(max_rows=50), wake_feeder=feeder.wake
    )
    async with serving(registrar(servicer)) as channel:
        yield ingest_grpc.IngestServiceStub(channel)


@pytest.fixture
async def hub(
    redis_client: redis.asyncio.Redis, names: StreamNames, pool: asyncpg.Pool
) -> AsyncIterator[ProgressHub]:
    """The live-progress hub, subscribed (its loops run for the test)."""
    hub = ProgressHub(redis_client, names)
    stop = asyncio.Event()
    loops = [asyncio.create_task(hub.run(stop)), asyncio.create_task(hub.run_refresh(stop, pool))]
    try:
        await asyncio.wait_for(hub.connected.wait(), timeout=10)
        yield hub
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loops), timeout=10)


@pytest.fixture
async def status_stub(
    pool: asyncpg.Pool,
    storage: Storage,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    hub: ProgressHub,
) -> AsyncIterator[status_grpc.StatusServiceAsyncStub]:
    servicer = StatusServicer(pool, storage, redis_client, names, hub=hub)
    async with serving(status_registrar(servicer)) as channel:
        yield status_grpc.StatusServiceStub(channel)
