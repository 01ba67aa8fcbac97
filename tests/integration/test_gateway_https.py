"""Whether a browser came over https decides the session cookie (`__Host-`, Secure) and the
gateway's own origin for the cross-site checks. A proxy's `X-Forwarded-Proto` or `Forwarded`
counts only from IMGPIPE_TRUSTED_PROXIES, as for the links (gateway/urls.py): a client that
connects directly cannot claim https.

Against a real SessionService (its API-key interceptor, Postgres) on 127.0.0.1, in this process.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import GatewaySettings
from services.common.auth import Limits, key_hash, new_key, parse_api_keys
from services.common.db.pool import migrate
from services.common.grpc_auth import ApiKeyInterceptor
from services.common.sessions import SessionStore
from services.common.storage import StorageConfig
from services.status.session_service import SessionServicer
from services.status.session_service import registrar as session_registrar
from testing.gateway import GatewayServer

Client = TestClient[web.Request, web.Application]
Gateway = Callable[..., AbstractAsyncContextManager[Client]]

KEY = new_key()
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)  # the test client's address
ELSEWHERE = (ipaddress.ip_network("10.0.0.0/8"),)
SAYS_HTTPS = {"X-Forwarded-Proto": "https"}
FORWARDED_HTTPS = {"Forwarded": "proto=https"}


@pytest.fixture
async def gateway(db_pool: asyncpg.Pool, tmp_path: Path) -> AsyncIterator[Gateway]:
    """Opens the gateway, with keys, in front of a SessionService, with settings changed."""
    await migrate(db_pool)
    keys, problems = parse_api_keys(f"acme-{secrets.token_hex(3)}:{key_hash(KEY)}", Limits())
    assert problems == []
    sessions = SessionStore(db_pool, keys)
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(keys, sessions=sessions.resolve)])
    session_registrar(SessionServicer(sessions))(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    settings = GatewaySettings(
        ingest_addr=f"127.0.0.1:{port}",
        status_addr=f"127.0.0.1:{port}",
        storage=StorageConfig((tmp_path / "store").as_uri()),
        rpc_timeout=10,
        api_keys=keys,
    )

    @asynccontextmanager
    async def open_gateway(**changes: Any) -> AsyncIterator[Client]:
        app = create_app(replace(settings, **changes))
        async with TestClient(GatewayServer(app, host="127.0.0.1")) as http:
            yield http

    try:
        yield open_gateway
    finally:
        await server.stop(None)


async def sign_in(http: Client, headers: dict[str, str]) -> aiohttp.ClientResponse:
    return await http.post(
        "/session", data={"key": KEY, "next": "/"}, headers=headers, allow_redirects=False
    )


def session_cookie(response: aiohttp.ClientResponse) -> tuple[str, bool]:
    """The name of the session cookie set, and whether it is Secure."""
    for header in response.headers.getall("Set-Cookie", []):
        for name, morsel in SimpleCookie(header).items():
            if name.endswith("imgpipe_session") and morsel.value:
                return name, bool(morsel["secure"])
    raise AssertionError(f"no session cookie in {response.headers.getall('Set-Cookie', [])}")


@pytest.mark.parametrize(
    ("changes", "headers", "cookie"),
    [
        # A trusted proxy that terminated TLS: the cookie the browser keeps for https only.
        ({"trusted_proxies": LOOPBACK}, SAYS_HTTPS, ("__Host-imgpipe_session", True)),
        ({"trusted_proxies": LOOPBACK}, FORWARDED_HTTPS, ("__Host-imgpipe_session", True)),
        # The same headers from a peer that is not a trusted proxy count for nothing.
        ({"trusted_proxies": ELSEWHERE}, SAYS_HTTPS, ("imgpipe_session", False)),
        ({}, SAYS_HTTPS, ("imgpipe_session", False)),
        ({}, FORWARDED_HTTPS, ("imgpipe_session", False)),
        # A trusted proxy that says http, or says nothing: plain http.
        ({"trusted_proxies": LOOPBACK}, {"X-Forwarded-Proto": "http"}, ("imgpipe_session", False)),
        ({"trusted_proxies": LOOPBACK}, {}, ("imgpipe_session", False)),
        # The operator says callers reach the gateway over https, as the links do.
        ({"public_api_url": "https://api.example"}, {}, ("__Host-imgpipe_session", True)),
    ],
    ids=[
        "trusted-x-forwarded",
        "trusted-forwarded",
        "untrusted-peer",
        "no-trusted-proxy",
        "no-trusted-proxy-forwarded",
        "trusted-says-http",
        "trusted-silent",
        "public-url-https",
    ],
)
async def test_only_a_trusted_proxy_can_say_the_caller_used_https(
    gateway: Gateway, changes: dict[str, Any], headers: dict[str, str], cookie: tuple[str, bool]
) -> None:
    async with gateway(**changes) as http:
        response = await sign_in(http, headers)
        assert response.status == 303, await response.text()
        assert session_cookie(response) == cookie


@pytest.mark.parametrize(
    ("trusted", "status"),
    [(LOOPBACK, 303), (ELSEWHERE, 403)],
    ids=["trusted", "untrusted"],
)
async def test_a_direct_client_cannot_make_an_https_origin_its_own(
    gateway: Gateway, trusted: tuple[ipaddress.IPv4Network, ...], status: int
) -> None:
    """The gateway's own origin is https only by a trusted proxy's word, so an https page
    (another origin than the http gateway it really is) cannot pass for this site."""
    async with gateway(trusted_proxies=trusted) as http:
        origin = f"https://{http.server.host}:{http.server.port}"
        response = await sign_in(http, {**SAYS_HTTPS, "Origin": origin})
        assert response.status == status, await response.text()
        # Its own scheme's origin is always this site.
        plain = await sign_in(http, {"Origin": f"http://{http.server.host}:{http.server.port}"})
        assert plain.status == 303, await plain.text()
