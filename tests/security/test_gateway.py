"""Findings 2, 4 and 6 of issue 14, against the gateway in front of real ingest and status
services (their API-key interceptor, Postgres, Redis), all in this process on 127.0.0.1.

- Finding 2: the GET /status page cache grew the gateway's memory without bound.
- Finding 4: cookie-authenticated writes were accepted from other sites, and the cookie held
  the raw API key.
- Finding 6: one key could hold any number of live progress streams open.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
import redis.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient
from grpc_health.v1 import health, health_pb2_grpc

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.handlers import KEEPALIVE
from gateway.keys import PRODUCT_PAGES
from gateway.product_page_cache import ProductPageCache
from services.common.auth import KeyRing, Limits, key_hash, new_key, parse_api_keys
from services.common.csv_format import CsvLimits
from services.common.db.pool import migrate
from services.common.grpc_auth import ApiKeyInterceptor
from services.common.limits import Limiter
from services.common.page_token import encode_page_token
from services.common.pb.imgpipe.v1 import session_service_pb2 as session_pb
from services.common.pb.imgpipe.v1 import session_service_pb2_grpc as session_grpc
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.common.session_ids import session_hash
from services.common.sessions import SessionStore
from services.common.storage import Storage, StorageConfig
from services.common.streams import StreamNames
from services.ingest.servicer import IngestServicer
from services.ingest.servicer import registrar as ingest_registrar
from services.status.progress import ProgressHub
from services.status.servicer import StatusServicer
from services.status.servicer import registrar as status_registrar
from services.status.session_service import SessionServicer
from services.status.session_service import registrar as session_registrar
from testing.gateway import GatewayServer
from testing.polling import wait_until_async
from testing.uploads import csv_of

Client = TestClient[web.Request, web.Application]

ACME, GLOBEX = new_key(), new_key()
PAGE_CACHE_BYTES = 256 * 1024
STREAMS = 2  # acme's streams= limit
URL = "http://127.0.0.1:9/"


@dataclass
class Gateway:
    http: Client
    app: web.Application
    status: status_grpc.StatusServiceAsyncStub  # direct, past the gateway
    channel: grpc.aio.Channel
    pool: asyncpg.Pool
    redis: redis.asyncio.Redis
    names: StreamNames
    tag: str  # the suffix of this test's owner names

    @property
    def pages(self) -> ProductPageCache:
        return self.app[PRODUCT_PAGES]

    async def upload(self, key: str, body: bytes) -> str:
        response = await self.http.post(
            "/upload", data=body, headers={**bearer(key), "Content-Type": "text/csv"}
        )
        assert response.status == 202, await response.text()
        request_id: str = (await response.json())["request_id"]
        return request_id


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def key_ring(tag: str, extra: str = "") -> KeyRing:
    keys, problems = parse_api_keys(
        f"acme{tag}:{key_hash(ACME)} rate=0 {extra}, globex{tag}:{key_hash(GLOBEX)} rate=0",
        Limits(),
    )
    assert problems == []
    return keys


@pytest.fixture
async def gateway(
    request: pytest.FixtureRequest,
    db_pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    redis_prefix: str,
    tmp_path: Path,
) -> AsyncIterator[Gateway]:
    """`request.param`: GatewaySettings fields to change."""
    await migrate(db_pool)
    names = StreamNames(f"{redis_prefix}:{secrets.token_hex(4)}")
    tag = f"-{secrets.token_hex(3)}"
    keys = key_ring(tag, f"streams={STREAMS}")
    limiter = Limiter(redis_client, names, db_pool)
    storage = StorageConfig((tmp_path / "store").as_uri())
    ingest = IngestServicer(db_pool, redis_client, names, CsvLimits(), limiter)
    hub = ProgressHub(redis_client, names)
    status = StatusServicer(
        db_pool, Storage.from_config(storage), redis_client, names, hub=hub, limiter=limiter
    )
    sessions = SessionStore(db_pool, keys)
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(keys, limiter.check_rate, sessions.resolve)]
    )
    ingest_registrar(ingest)(server)
    status_registrar(status)(server)
    session_registrar(SessionServicer(sessions))(server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loops = [asyncio.create_task(hub.run(stop))]
    settings = GatewaySettings(
        ingest_addr=f"127.0.0.1:{port}",
        status_addr=f"127.0.0.1:{port}",
        storage=storage,
        rpc_timeout=10,
        api_keys=keys,
        page_cache_bytes=PAGE_CACHE_BYTES,
        **getattr(request, "param", {}),
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        app = create_app(settings)
        async with TestClient(GatewayServer(app, host="127.0.0.1")) as http:
            await asyncio.wait_for(hub.connected.wait(), timeout=10)
            yield Gateway(
                http,
                app,
                status_grpc.StatusServiceStub(channel),
                channel,
                db_pool,
                redis_client,
                names,
                tag,
            )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loops), timeout=20)
        await channel.close(None)
        await server.stop(None)


def long_urls_csv(products: int, url_length: int = 2000) -> bytes:
    """Products with ten long image URLs each (about 20 KiB a product)."""
    return csv_of(
        [
            (
                str(i + 1),
                f"Product {i}",
                [f"{URL}{i}/{j}/" + "a" * (url_length - 40) + ".jpg" for j in range(10)],
            )
            for i in range(products)
        ]
    )


def spellings(row: int) -> list[str]:
    """Tokens a lenient decoder reads as the page after `row`, other than the canonical one."""
    texts = [f"v1:{'0' * zeros}{row}" for zeros in range(4)]
    padded = [base64.urlsafe_b64encode(text.encode()).decode() for text in texts]
    others = [token.rstrip("=") + "=" * pad for token in padded for pad in range(4)]
    return [token for token in others if token != encode_page_token(row)]


# ---------------------------------------------------------------- finding 2: the page cache


async def test_finding_2_the_page_cache_stays_within_its_byte_cap(gateway: Gateway) -> None:
    request_id = await gateway.upload(ACME, long_urls_csv(40))
    # 16 distinct pages (page sizes), each legitimately kept, and each far from small.
    for size in range(25, 41):
        response = await gateway.http.get(
            f"/status/{request_id}", params={"page_size": str(size)}, headers=bearer(ACME)
        )
        assert response.status == 200
        assert len(await response.read()) > PAGE_CACHE_BYTES // 8
        kept = sum(len(body) for body in _bodies(gateway.pages))
        assert kept <= PAGE_CACHE_BYTES
    # Small pages are kept, up to the cap, and their bytes are what is counted.
    for size in range(1, 17):
        response = await gateway.http.get(
            f"/status/{request_id}", params={"page_size": str(size)}, headers=bearer(ACME)
        )
        assert response.status == 200
    assert 0 < sum(len(body) for body in _bodies(gateway.pages)) <= PAGE_CACHE_BYTES


def _bodies(pages: ProductPageCache) -> list[bytes]:
    # Read past the cache's own accounting: this is what it actually holds.
    return [entry.body for entry in pages._entries.values()]


async def test_finding_2_other_spellings_of_a_page_token_are_400(gateway: Gateway) -> None:
    request_id = await gateway.upload(ACME, long_urls_csv(3, url_length=100))
    first = await gateway.http.get(
        f"/status/{request_id}", params={"page_size": "1"}, headers=bearer(ACME)
    )
    token = (await first.json())["next_page_token"]
    row = 2  # the first product's spreadsheet row
    assert token == encode_page_token(row)
    assert (
        await gateway.http.get(
            f"/status/{request_id}",
            params={"page_size": "1", "page_token": token},
            headers=bearer(ACME),
        )
    ).status == 200
    kept = len(gateway.pages)
    for other in spellings(row):
        response = await gateway.http.get(
            f"/status/{request_id}",
            params={"page_size": "1", "page_token": other},
            headers=bearer(ACME),
        )
        assert response.status == 400, other
        error = (await response.json())["error"]
        assert [d["column"] for d in error["details"]] == ["page_token"]
        # The status service refuses them too, for gRPC callers and the HTML page.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await gateway.status.ListProducts(
                status_pb.ListProductsRequest(request_id=request_id, page_token=other),
                metadata=(("authorization", f"Bearer {ACME}"),),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in (refused.value.details() or "")
    assert len(gateway.pages) == kept
    page = await gateway.http.get(
        f"/ui/requests/{request_id}", params={"page_token": spellings(row)[0]}, headers=bearer(ACME)
    )
    assert (page.status, page.content_type) == (400, "text/html")
    assert "page_token" in await page.text()


# ---------------------------------------------------------------- finding 4: CSRF, the cookie


async def sign_in(gateway: Gateway, key: str = ACME) -> str:
    """Sign in as the web page does; the cookie's value."""
    response = await gateway.http.post(
        "/session",
        data={"key": key},
        headers={"Origin": origin(gateway)},
        allow_redirects=False,
    )
    assert response.status == 303, await response.text()
    cookie = response.cookies["imgpipe_session"]
    attributes = response.headers["Set-Cookie"]
    assert "HttpOnly" in attributes and "SameSite=Strict" in attributes
    return cookie.value


def origin(gateway: Gateway) -> str:
    return str(gateway.http.make_url("/")).rstrip("/")


def cookie(session: str) -> dict[str, str]:
    return {"Cookie": f"imgpipe_session={session}"}


def form_upload() -> Any:
    form = aiohttp.FormData()
    form.add_field("file", long_urls_csv(1, url_length=100), filename="p.csv")
    return form


async def test_finding_4_cookie_writes_from_another_site_are_403(gateway: Gateway) -> None:
    session = await sign_in(gateway)
    request_id = await gateway.upload(ACME, long_urls_csv(1, url_length=100))
    elsewhere = [
        {"Origin": "http://evil.test"},
        {"Origin": origin(gateway).replace("127.0.0.1", "localhost")},  # another host
        {"Origin": origin(gateway).rsplit(":", 1)[0] + ":1"},  # another port: same site
        {"Origin": "null"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": origin(gateway)},
        {},  # no evidence of where it comes from
    ]
    writes: list[tuple[str, Callable[[], bytes]]] = [
        ("/upload", lambda: long_urls_csv(1, url_length=100)),
        (f"/requests/{request_id}/retry", lambda: b""),
    ]
    for headers in elsewhere:
        for path, body in writes:
            response = await gateway.http.post(
                path,
                data=body(),
                headers={**cookie(session), **headers, "Content-Type": "text/csv"},
            )
            assert response.status == 403, (path, headers)
            assert (await response.json())["error"]["code"] == "permission_denied"
        page = await gateway.http.post(
            "/ui/upload", data=form_upload(), headers={**cookie(session), **headers}
        )
        assert page.status == 403, headers
        assert page.content_type == "text/html"
    # From this site the same writes go through, and a bearer key is not affected at all.
    for headers in ({"Origin": origin(gateway)}, {"Sec-Fetch-Site": "same-origin"}):
        response = await gateway.http.post(
            "/upload",
            data=long_urls_csv(1, url_length=100),
            headers={**cookie(session), **headers, "Content-Type": "text/csv"},
        )
        assert response.status == 202, await response.text()
    page = await gateway.http.post(
        "/ui/upload",
        data=form_upload(),
        headers={**cookie(session), "Origin": origin(gateway)},
        allow_redirects=False,
    )
    assert page.status == 303
    response = await gateway.http.post(
        "/upload",
        data=long_urls_csv(1, url_length=100),
        headers={**bearer(ACME), "Origin": "http://evil.test", "Content-Type": "text/csv"},
    )
    assert response.status == 202


async def test_finding_4_the_cookie_is_a_revocable_session_not_the_key(gateway: Gateway) -> None:
    session = await sign_in(gateway)
    assert ACME not in session and session.startswith("ses_")
    request_id = await gateway.upload(ACME, long_urls_csv(1, url_length=100))
    assert (await gateway.http.get(f"/status/{request_id}", headers=cookie(session))).status == 200
    # The session acts for its owner only.
    other_id = await gateway.upload(GLOBEX, long_urls_csv(1, url_length=100))
    assert (await gateway.http.get(f"/status/{other_id}", headers=cookie(session))).status == 404
    # The services accept it too, and it cannot make itself a successor.
    as_session = (("authorization", f"Session {session}"),)
    got = await gateway.status.GetRequest(
        status_pb.GetRequestRequest(request_id=request_id), metadata=as_session, timeout=10
    )
    assert got.request.request_id == request_id
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await session_grpc.SessionServiceStub(gateway.channel).CreateSession(
            session_pb.CreateSessionRequest(), metadata=as_session, timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    out = await gateway.http.post(
        "/session/logout",
        headers={**cookie(session), "Origin": origin(gateway)},
        allow_redirects=False,
    )
    assert out.status == 303
    assert out.cookies["imgpipe_session"]["max-age"] == "0"

    # Revoked on the server, not only forgotten by this browser: replaying it is refused.
    async def refused_everywhere() -> bool:
        response = await gateway.http.get(f"/status/{request_id}", headers=cookie(session))
        return response.status == 401

    await wait_until_async(refused_everywhere, timeout=10, message="the session refused")
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await gateway.status.GetRequest(
            status_pb.GetRequestRequest(request_id=request_id), metadata=as_session, timeout=10
        )
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    forged = await gateway.http.get(f"/status/{request_id}", headers=cookie(ACME))
    assert forged.status == 401  # the key itself is no cookie


async def test_finding_4_sessions_expire(gateway: Gateway) -> None:
    session = await sign_in(gateway)
    request_id = await gateway.upload(ACME, long_urls_csv(1, url_length=100))
    await gateway.pool.execute(
        "UPDATE sessions SET expires_at = now() - interval '1 second' WHERE id_hash = $1",
        session_hash(session),
    )

    async def refused() -> bool:
        response = await gateway.http.get(f"/status/{request_id}", headers=cookie(session))
        return response.status == 401

    await wait_until_async(refused, timeout=10, message="the expired session refused")


# ---------------------------------------------------------------- finding 6: live streams


async def test_finding_6_streams_over_the_keys_limit_are_429(gateway: Gateway) -> None:
    request_id = await gateway.upload(ACME, long_urls_csv(1, url_length=100))
    path = f"/requests/{request_id}/events"
    async with contextlib.AsyncExitStack() as open_streams:
        for _ in range(STREAMS):
            stream = await open_streams.enter_async_context(
                gateway.http.get(path, headers=bearer(ACME))
            )
            assert stream.status == 200
            assert (await stream.content.readuntil(b"\n\n")).startswith(b"event: progress")
        over = await gateway.http.get(path, headers=bearer(ACME))
        assert over.status == 429
        assert int(over.headers["Retry-After"]) >= 1
        error = (await over.json())["error"]
        assert [d["column"] for d in error["details"]] == ["streams"]
        assert "streams=2" in error["message"]
        # The limit is per key: another owner's streams are not counted with acme's.
        other_id = await gateway.upload(GLOBEX, long_urls_csv(1, url_length=100))
        other = await gateway.http.get(f"/requests/{other_id}/events", headers=bearer(GLOBEX))
        assert other.status == 200
        other.close()
        # Direct gRPC callers count against the same limit.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anext(
                aiter(
                    gateway.status.WatchRequest(
                        status_pb.WatchRequestRequest(request_id=request_id),
                        metadata=(("authorization", f"Bearer {ACME}"),),
                        timeout=10,
                    )
                )
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # A closed stream gives its slot back.
    async def reopened() -> bool:
        response = await gateway.http.get(path, headers=bearer(ACME))
        response.close()
        return response.status == 200

    await wait_until_async(reopened, timeout=10, message="a slot given back")


async def test_finding_6_the_leases_of_a_dead_process_run_out(gateway: Gateway) -> None:
    request_id = await gateway.upload(ACME, long_urls_csv(1, url_length=100))
    owner = f"acme{gateway.tag}"
    key = f"{gateway.names.prefix}:limits:streams:{owner}"
    # A lease held elsewhere, and one a crashed status service took and never renewed.
    held_elsewhere = (time.time() + 3600) * 1000
    await gateway.redis.zadd(key, {"elsewhere": held_elsewhere, "dead": 1000})
    path = f"/requests/{request_id}/events"
    async with gateway.http.get(path, headers=bearer(ACME)) as response:
        assert response.status == 200  # the dead lease no longer counts
        async with gateway.http.get(path, headers=bearer(ACME)) as over:
            assert over.status == 429  # the live one does, across processes


@pytest.mark.parametrize("gateway", [{"watch_timeout": 0.5}], indirect=True)
async def test_finding_6_a_stream_ends_at_its_time_limit_with_reconnect(gateway: Gateway) -> None:
    request_id = await gateway.upload(ACME, long_urls_csv(1, url_length=100))
    async with gateway.http.get(f"/requests/{request_id}/events", headers=bearer(ACME)) as stream:
        assert stream.status == 200
        text = (await asyncio.wait_for(stream.read(), timeout=20)).decode()
    events = [block.splitlines()[0] for block in text.strip().split("\n\n")]
    assert events == ["event: progress", "event: reconnect"]


async def test_finding_6_a_stream_whose_client_left_gives_its_slot_back_within_seconds(
    gateway: Gateway,
) -> None:
    """Not at the next keep-alive (gateway/handlers.py KEEPALIVE, 15 s): a client that drops
    its streams may open new ones at once. The handler is cancelled (gateway/serving.py's runner
    options, which testing/gateway.py serves the tests with too), and the
    cancelled stream gives back its lease through the status service."""
    request_id = await gateway.upload(ACME, long_urls_csv(1, url_length=100))
    path = f"/requests/{request_id}/events"
    for _ in range(STREAMS):
        stream = await gateway.http.get(path, headers=bearer(ACME))
        assert stream.status == 200
        assert (await stream.content.readuntil(b"\n\n")).startswith(b"event: progress")
        stream.close()  # the connection goes, mid-stream
    dropped = time.monotonic()

    async def all_slots_back() -> bool:
        async with contextlib.AsyncExitStack() as open_streams:
            for _ in range(STREAMS):
                stream = await open_streams.enter_async_context(
                    gateway.http.get(path, headers=bearer(ACME))
                )
                if stream.status != 200:
                    return False
            return True

    await wait_until_async(all_slots_back, timeout=5, message="both slots given back")
    assert time.monotonic() - dropped < KEEPALIVE / 2
