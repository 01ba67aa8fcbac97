"""Each service as a real process: gRPC health and reflection, and a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import secrets
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from testing.databases import delete_keys
from testing.origin import serve_images
from testing.polling import wait_until_async
from testing.ports import free_tcp_port
from testing.services import start_service
from testing.uploads import csv_of, upload

pytestmark = pytest.mark.e2e

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def service_env(
    database_url: str, redis_server_url: str, tmp_path: Path
) -> Iterator[dict[str, str]]:
    """The services' settings, with a Redis prefix of this test's own, deleted after it."""
    prefix = f"imgpipe-svc-{secrets.token_hex(4)}"
    yield {
        "IMGPIPE_DATABASE_URL": database_url,
        "IMGPIPE_REDIS_URL": redis_server_url,
        "IMGPIPE_REDIS_PREFIX": prefix,
        "IMGPIPE_STORAGE_URL": (tmp_path / "store").as_uri(),
        "IMGPIPE_GRACE_SECONDS": "15",
    }
    delete_keys(redis_server_url, f"{prefix}:*")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


@pytest.fixture
async def channels() -> AsyncIterator[list[grpc.aio.Channel]]:
    opened: list[grpc.aio.Channel] = []
    yield opened
    for channel in opened:
        await channel.close(None)


async def wait_serving(
    channel: grpc.aio.Channel, process: subprocess.Popen[bytes], log: Path
) -> None:
    stub: Any = health_pb2_grpc.HealthStub(channel)  # typeshed lists no methods

    async def serving() -> bool:
        if process.poll() is not None:
            output = await asyncio.to_thread(log.read_text)
            raise AssertionError(f"exited with {process.returncode}:\n{output[-3000:]}")
        response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        return bool(response.status == SERVING)

    await wait_until_async(serving, timeout=30, message="SERVING", ignore=(grpc.aio.AioRpcError,))


@pytest.mark.parametrize(
    ("module", "service_name"),
    [
        ("services.ingest", "imgpipe.v1.IngestService"),
        ("services.status", "imgpipe.v1.StatusService"),
        ("services.worker", None),
    ],
)
async def test_health_reflection_and_drain(
    module: str,
    service_name: str | None,
    service_env: dict[str, str],
    processes: list[subprocess.Popen[bytes]],
    channels: list[grpc.aio.Channel],
    tmp_path: Path,
) -> None:
    listen = f"127.0.0.1:{free_tcp_port()}"
    log = tmp_path / "service.log"
    process = start_service(module, {**service_env, "IMGPIPE_GRPC_LISTEN": listen}, log)
    processes.append(process)
    channel = grpc.aio.insecure_channel(listen)
    channels.append(channel)
    await wait_serving(channel, process, log)
    health: Any = health_pb2_grpc.HealthStub(channel)

    if service_name is not None:
        named = await health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=2)
        assert named.status == SERVING

    # typeshed types the stub for grpc.Channel only; grpc.aio channels work the same.
    reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
    answers = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    listed = {s.name async for a in answers for s in a.list_services_response.service}
    assert "grpc.health.v1.Health" in listed
    assert service_name is None or service_name in listed

    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    updates = aiter(watch)
    assert (await anext(updates)).status == SERVING
    process.send_signal(signal.SIGTERM)
    assert (await anext(updates)).status == NOT_SERVING
    watch.cancel()  # an open stream would hold server.stop() for the whole grace period
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert '"msg": "stopped"' in log.read_text()


async def test_sigterm_lets_a_busy_worker_finish_its_images(
    service_env: dict[str, str],
    processes: list[subprocess.Popen[bytes]],
    channels: list[grpc.aio.Channel],
    database_url: str,
    redis_server_url: str,
    tmp_path: Path,
) -> None:
    async with serve_images((400, 300), delay=2.0) as origin:
        env = {**service_env, "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}"}
        ingest_listen = f"127.0.0.1:{free_tcp_port()}"
        worker_listen = f"127.0.0.1:{free_tcp_port()}"
        ingest = start_service(
            "services.ingest",
            {**env, "IMGPIPE_GRPC_LISTEN": ingest_listen},
            tmp_path / "ingest.log",
        )
        worker = start_service(
            "services.worker",
            {**env, "IMGPIPE_GRPC_LISTEN": worker_listen, "IMGPIPE_WORKER_CONCURRENCY": "4"},
            tmp_path / "worker.log",
        )
        processes.extend([ingest, worker])
        ingest_channel = grpc.aio.insecure_channel(ingest_listen)
        worker_channel = grpc.aio.insecure_channel(worker_listen)
        channels.extend([ingest_channel, worker_channel])
        await wait_serving(ingest_channel, ingest, tmp_path / "ingest.log")
        await wait_serving(worker_channel, worker, tmp_path / "worker.log")

        urls = [origin.url(f"/img/busy{i}.jpg") for i in range(4)]
        accepted = await upload(
            ingest_grpc.IngestServiceStub(ingest_channel), csv_of([("1", "Shoe", urls)])
        )
        tasks = f"{env['IMGPIPE_REDIS_PREFIX']}:tasks"
        client = redis.asyncio.Redis.from_url(redis_server_url)
        try:

            async def all_in_flight() -> bool:
                summary = await client.xpending(tasks, "workers")
                return bool(summary["pending"] == 4)

            await wait_until_async(all_in_flight, timeout=20, message="4 images in flight")
            worker.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(worker.wait, 30) == 0
            assert (await client.xpending(tasks, "workers"))["pending"] == 0
        finally:
            await client.aclose()

    connection = await asyncpg.connect(database_url)
    try:
        statuses = await connection.fetch(
            "SELECT status FROM images WHERE request_id = $1", uuid.UUID(accepted.request_id)
        )
        request_status = await connection.fetchval(
            "SELECT status FROM requests WHERE id = $1", uuid.UUID(accepted.request_id)
        )
    finally:
        await connection.close()
    assert [r["status"] for r in statuses] == ["Done"] * 4
    assert request_status == "Completed"
