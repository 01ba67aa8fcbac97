"""The gateway's RateLimit-* headers (draft-ietf-httpapi-ratelimit-headers-07) from the quota the
services' API-key interceptor reports, and the Cache-Control of the stored files it serves:
against real ingest and status servicers, Postgres and Redis, in this process on 127.0.0.1."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import GatewaySettings
from services.common.auth import Limits, key_hash, new_key, parse_api_keys
from services.common.csv_format import CsvLimits
from services.common.db.pool import migrate
from services.common.grpc_auth import ApiKeyInterceptor
from services.common.limits import Limiter
from services.common.storage import Storage, StorageConfig
from services.common.streams import StreamNames
from services.ingest.servicer import IngestServicer
from services.ingest.servicer import registrar as ingest_registrar
from services.status.servicer import StatusServicer
from services.status.servicer import registrar as status_registrar
from testing.gateway import GatewayServer

pytestmark = pytest.mark.integration

KEY = new_key()
BURST = 4
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(
    db_pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, redis_prefix: str, tmp_path: Path
) -> AsyncIterator[Client]:
    """The gateway with keys, in front of ingest and status on one gRPC server. The key may
    make 4 calls at once, refilled at one every 10 seconds."""
    await migrate(db_pool)
    names = StreamNames(f"{redis_prefix}:{secrets.token_hex(4)}")
    owner = f"acme-{secrets.token_hex(3)}"  # a rate bucket of this test's own
    keys, problems = parse_api_keys(f"{owner}:{key_hash(KEY)} rate=6/min burst={BURST}", Limits())
    assert problems == []
    limiter = Limiter(redis_client, names, db_pool)
    storage = StorageConfig((tmp_path / "store").as_uri())
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(keys, limiter.check_rate)])
    ingest_registrar(IngestServicer(db_pool, redis_client, names, CsvLimits(), limiter))(server)
    status = StatusServicer(db_pool, Storage.from_config(storage), redis_client, names)
    status_registrar(status)(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    settings = GatewaySettings(
        ingest_addr=f"127.0.0.1:{port}",
        status_addr=f"127.0.0.1:{port}",
        storage=storage,
        rpc_timeout=10,
        api_keys=keys,
    )
    try:
        async with TestClient(GatewayServer(create_app(settings), host="127.0.0.1")) as http:
            yield http
    finally:
        await server.stop(None)


AUTH = {"Authorization": f"Bearer {KEY}"}


async def test_each_charged_call_answers_with_the_keys_quota_until_it_is_spent(
    client: Client,
) -> None:
    remaining = []
    for _ in range(2):
        # Two calls each (GetRequest and ListProducts): the answer gives the lower quota.
        response = await client.get(f"/status/{uuid.uuid4()}", headers=AUTH)
        assert response.status == 404  # charged all the same: the calls reached status
        assert response.headers["RateLimit-Limit"] == str(BURST)
        assert response.headers["RateLimit-Policy"] == f"{BURST};w=40"  # 4 calls refill in 40 s
        assert 0 < int(response.headers["RateLimit-Reset"]) <= 40
        remaining.append(int(response.headers["RateLimit-Remaining"]))
    assert remaining == [2, 0]

    refused = await client.get(f"/status/{uuid.uuid4()}", headers=AUTH)
    assert refused.status == 429
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert refused.headers["RateLimit-Limit"] == str(BURST)
    assert int(refused.headers["Retry-After"]) >= 1
    assert 0 < int(refused.headers["RateLimit-Reset"]) <= 40

    # Routes that charge nothing say nothing about the quota.
    health = await client.get("/healthz")
    assert health.status == 200
    assert "RateLimit-Limit" not in health.headers


async def test_stored_images_are_immutable_but_the_output_csv_is_revalidated(
    client: Client, tmp_path: Path
) -> None:
    request_id = uuid.uuid4()
    folder = tmp_path / "store" / "requests" / str(request_id)
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "7.webp").write_bytes(b"RIFF....WEBP")
    (folder / "output.csv").write_text("S. No.,Product Name\n")

    image = await client.get(f"/files/requests/{request_id}/images/7.webp", headers=AUTH)
    assert image.status == 200
    assert image.headers["Cache-Control"] == "public, max-age=31536000, immutable"

    table = await client.get(f"/files/requests/{request_id}/output.csv", headers=AUTH)
    assert table.status == 200
    # A retry renders the CSV again under the same key: caches must ask every time.
    assert table.headers["Cache-Control"] == "no-cache"
    assert "Last-Modified" in table.headers or "ETag" in table.headers
