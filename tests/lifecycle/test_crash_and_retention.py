"""A delete killed with SIGKILL half way and finished by a retry; a cancel killed half way and
finished by the reconciler; and the retention janitor with its clock moved past the retention
period, against requests the real stack processed."""

from __future__ import annotations

import asyncio
import secrets
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import grpc
import pytest
import redis.asyncio
from prometheus_client import REGISTRY

from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.common.storage import Storage
from services.common.streams import StreamNames
from services.worker.janitor import Janitor
from testing.origin import ImageOrigin, serve_images
from testing.polling import wait_until_async
from testing.ports import free_tcp_port
from testing.services import start_service
from testing.stack import Stack, start_stack
from tests.e2e.test_pipeline import upload_csv, wait_completed
from tests.lifecycle.test_cancel import csv_of

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def prefix() -> str:
    return f"imgpipe-life-{secrets.token_hex(4)}"


@pytest.fixture
def stack(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    image_origin: ImageOrigin,
    stack_factory: list[Stack],
    prefix: str,
) -> Stack:
    started = start_stack(
        tmp_path,
        {
            "IMGPIPE_DATABASE_URL": database_url,
            "IMGPIPE_REDIS_URL": redis_server_url,
            "IMGPIPE_REDIS_PREFIX": prefix,
            "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{image_origin.port}",
            "IMGPIPE_DEV_WORKERS": "1",
        },
    )
    stack_factory.append(started)
    return started


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as opened:
        yield opened


async def _completed(http: aiohttp.ClientSession, stack: Stack, origin: ImageOrigin) -> str:
    urls = [origin.url(f"/img/{uuid.uuid4().hex}.jpg") for _ in range(3)]
    response = await upload_csv(http, stack.base_url, csv_of(urls))
    assert response.status == 202, await response.text()
    request_id: str = (await response.json())["request_id"]
    await wait_completed(http, stack.base_url, request_id)
    return request_id


def _stored(stack: Stack, request_id: str) -> list[Path]:
    return [
        p for p in (stack.data_dir / "store" / "requests" / request_id).rglob("*") if p.is_file()
    ]


async def _rows(pool: asyncpg.Pool, request_id: str) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM images WHERE request_id = $1", uuid.UUID(request_id)
        )
    )


async def test_kill_9_during_a_delete_then_a_retry_finishes_it(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    image_origin: ImageOrigin,
    stack: Stack,
    prefix: str,
    pool: asyncpg.Pool,
) -> None:
    async with aiohttp.ClientSession() as http:
        request_id = await _completed(http, stack, image_origin)
        assert len(_stored(stack, request_id)) == 4
        # Killed between the objects and the rows: the worst moment, when the request is
        # neither whole nor gone.
        delete = status_pb.DeleteRequestRequest(request_id=request_id)
        await _killed_inside(
            Backing(tmp_path, database_url, redis_server_url, prefix, stack),
            "delete.before_rows",
            lambda stub: stub.DeleteRequest(delete, timeout=60, wait_for_ready=True),
        )

        # Half done: the objects are gone, the rows are not, and the request is already gone
        # for its owner.
        assert _stored(stack, request_id) == []
        assert await _rows(pool, request_id) == 3
        async with http.get(f"{stack.base_url}/status/{request_id}") as response:
            assert response.status == 404
        async with http.get(f"{stack.base_url}/requests") as response:
            listed = [r["request_id"] for r in (await response.json())["requests"]]
        assert request_id not in listed

        # The retry finishes it.
        async with http.delete(f"{stack.base_url}/requests/{request_id}") as response:
            assert response.status == 204, await response.text()
        assert await _rows(pool, request_id) == 0
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM requests WHERE id = $1", uuid.UUID(request_id)
            )
            == 0
        )
        async with http.delete(f"{stack.base_url}/requests/{request_id}") as response:
            assert response.status == 404


@dataclass(frozen=True, slots=True)
class Backing:
    """Where a stack keeps its state, for a status service of the test's own beside it."""

    folder: Path
    database_url: str
    redis_url: str
    prefix: str
    stack: Stack


async def _killed_inside(
    backing: Backing,
    failpoint: str,
    call: Callable[[status_grpc.StatusServiceAsyncStub], Awaitable[object]],
) -> None:
    """`call` on a status service of its own, on the stack's backends, armed to SIGKILL itself
    at `failpoint`: the call fails UNAVAILABLE and the service is dead."""
    listen = f"127.0.0.1:{free_tcp_port()}"
    armed = start_service(
        "services.status",
        {
            "IMGPIPE_DATABASE_URL": backing.database_url,
            "IMGPIPE_REDIS_URL": backing.redis_url,
            "IMGPIPE_REDIS_PREFIX": backing.prefix,
            "IMGPIPE_STORAGE_URL": (backing.stack.data_dir / "store").as_uri(),
            "IMGPIPE_GRPC_LISTEN": listen,
            "IMGPIPE_FAILPOINTS": failpoint,
        },
        backing.folder / "armed-status.log",
    )
    try:
        async with grpc.aio.insecure_channel(listen) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call(status_grpc.StatusServiceStub(channel))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
        assert await asyncio.to_thread(armed.wait, 10) == -signal.SIGKILL
    finally:
        if armed.poll() is None:
            armed.kill()
            armed.wait(10)


async def test_kill_9_during_a_cancel_then_the_reconciler_finishes_it(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    stack_factory: list[Stack],
    prefix: str,
    pool: asyncpg.Pool,
) -> None:
    """Killed after the cancel's first chunk: every image failed CANCELLED, the request marked
    and still open, its output CSV not written and its event not published. A worker's
    reconciler finishes it as the status service would have."""
    async with serve_images((160, 120), delay=0.3) as origin:
        stack = start_stack(
            tmp_path,
            {
                "IMGPIPE_DATABASE_URL": database_url,
                "IMGPIPE_REDIS_URL": redis_server_url,
                "IMGPIPE_REDIS_PREFIX": prefix,
                "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}",
                "IMGPIPE_DEV_WORKERS": "1",
                "IMGPIPE_WORKER_CONCURRENCY": "2",
                "IMGPIPE_RECONCILE_INTERVAL": "0.5",
                "IMGPIPE_RECONCILE_MIN_AGE": "1",
            },
        )
        stack_factory.append(stack)
        urls = [origin.url(f"/img/{uuid.uuid4().hex}.jpg") for _ in range(40)]
        async with aiohttp.ClientSession() as http:
            response = await upload_csv(http, stack.base_url, csv_of(urls))
            assert response.status == 202, await response.text()
            request_id: str = (await response.json())["request_id"]
            request_uuid = uuid.UUID(request_id)

            async def some_done() -> bool:
                done = await pool.fetchval(
                    "SELECT images_done FROM requests WHERE id = $1", request_uuid
                )
                return bool(done)

            await wait_until_async(some_done, timeout=60, message="an image done")
            cancel = status_pb.CancelRequestRequest(request_id=request_id)
            await _killed_inside(
                Backing(tmp_path, database_url, redis_server_url, prefix, stack),
                "cancel.after_chunk",
                lambda stub: stub.CancelRequest(cancel, timeout=60, wait_for_ready=True),
            )

            async def cancelled() -> asyncpg.Record | None:
                row = await pool.fetchrow(
                    """SELECT status, images_done, images_failed, images_total,
                              finished_event_at
                         FROM requests WHERE id = $1""",
                    request_uuid,
                )
                if row is None or row["status"] != "Cancelled":
                    return None
                return row if row["finished_event_at"] is not None else None

            row = await wait_until_async(
                cancelled, timeout=30, message="the reconciler to finish the cancel"
            )
            assert row["images_done"] >= 1
            assert row["images_done"] + row["images_failed"] == row["images_total"] == 40
            pending = await pool.fetchval(
                "SELECT count(*) FROM images WHERE request_id = $1 AND status = 'Pending'",
                request_uuid,
            )
            assert pending == 0
            async with http.get(f"{stack.base_url}/requests/{request_id}/output.csv") as got:
                assert got.status == 200, await got.text()
                assert "CANCELLED" in await got.text()
            # Final like any other (and gone, for the retention test on the same database).
            async with http.delete(f"{stack.base_url}/requests/{request_id}") as deleted:
                assert deleted.status == 204, await deleted.text()


async def test_retention_deletes_final_requests_older_than_the_period(
    redis_server_url: str,
    image_origin: ImageOrigin,
    stack: Stack,
    prefix: str,
    pool: asyncpg.Pool,
) -> None:
    async with aiohttp.ClientSession() as http:
        old = [await _completed(http, stack, image_origin) for _ in range(3)]
    stored = sum(p.stat().st_size for r in old for p in _stored(stack, r))
    client = redis.asyncio.Redis.from_url(redis_server_url)
    storage = Storage.from_url((stack.data_dir / "store").as_uri())
    now = datetime.now(UTC)

    def janitor(days: int, clock: datetime) -> Janitor:
        return Janitor(
            pool=pool,
            redis=client,
            names=StreamNames(prefix),
            storage=storage,
            retention_days=days,
            batch=2,
            clock=lambda: clock,
        )

    try:
        # Within the period, and with retention off, nothing goes.
        assert (await janitor(30, now + timedelta(days=29)).sweep_once()).requests == 0
        assert (await janitor(0, now + timedelta(days=365)).sweep_once()).requests == 0
        before = _sample("imgpipe_retention_requests_deleted_total")
        bytes_before = _sample("imgpipe_retention_bytes_deleted_total")

        # Past it: bounded batches of 2, the second pass takes the rest.
        later = janitor(30, now + timedelta(days=31))
        first = await later.sweep_once()
        assert (first.requests, first.full) == (2, True)
        second = await later.sweep_once()
        assert (second.requests, second.full) == (1, False)
        assert first.bytes + second.bytes == stored
        assert _sample("imgpipe_retention_requests_deleted_total") - before == 3
        assert _sample("imgpipe_retention_bytes_deleted_total") - bytes_before == stored
    finally:
        await client.aclose()

    async with aiohttp.ClientSession() as http:
        for request_id in old:
            assert _stored(stack, request_id) == []
            async with http.get(f"{stack.base_url}/status/{request_id}") as response:
                assert response.status == 404
    ids = [uuid.UUID(r) for r in old]
    assert await pool.fetchval("SELECT count(*) FROM requests WHERE id = ANY($1)", ids) == 0


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0
