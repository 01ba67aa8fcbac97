"""fetch_image and the SSRF guard, against real aiohttp servers on 127.0.0.1.

Network rule: nothing here may connect anywhere but 127.0.0.1 / ::1. Host names are answered
by an injected resolver (no real DNS), and the `dialled` fixture wraps the event loop's
sock_connect so any other destination fails the test before a packet leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ipaddress
import itertools
import pickle
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from yarl import URL

from services.common.fetch import (
    RESERVE_STEP,
    BlockedConnectError,
    FetchAllow,
    FetchLimits,
    GuardedResolver,
    OriginBusy,
    OriginKey,
    OriginTurns,
    failure_from_exception,
    fetch_image,
    is_public_address,
    make_session,
    origin_key,
    parse_retry_after,
)
from services.common.outcome import ImageFailure, OutcomeCode
from testing.polling import wait_until_async

pytestmark = pytest.mark.unit

LOOPBACK = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
IMAGE = bytes(range(256)) * 40  # any bytes: fetch does not decode
RELEASE = web.AppKey("release", asyncio.Event)
SEEN = web.AppKey("seen", list[str])  # the path of every request the server received


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def dialled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address a test dials, in order; anything but loopback fails before connecting."""
    loop = asyncio.get_running_loop()
    original = loop.sock_connect
    log: list[tuple[str, int]] = []

    async def guarded(sock: socket.socket, address: Any) -> None:
        host, port = str(address[0]), int(address[1])
        log.append((host, port))
        if ipaddress.ip_address(host.split("%")[0]) not in LOOPBACK:
            raise AssertionError(f"test tried to connect to {host}:{port}")
        await original(sock, address)

    monkeypatch.setattr(loop, "sock_connect", guarded)
    return log


class StaticResolver(AbstractResolver):
    """Answers from a table: each name maps to a list of answers; every lookup takes the next
    one and the last one repeats. Unknown names fail like NXDOMAIN."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = {name: list(answers) for name, answers in table.items()}
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        answers = self.table.get(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        current = answers.pop(0) if len(answers) > 1 else answers[0]
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in current
        ]

    async def close(self) -> None:
        pass


class ForbiddenResolver(StaticResolver):
    """For tests where resolving at all would be a bug."""

    def __init__(self) -> None:
        super().__init__({})

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        raise AssertionError(f"{host} must not be resolved")


async def image(request: web.Request) -> web.Response:
    return web.Response(body=IMAGE, content_type="image/jpeg")


async def status(request: web.Request) -> web.Response:
    headers = {}
    if "retry_after" in request.query:
        headers["Retry-After"] = request.query["retry_after"]
    return web.Response(status=int(request.match_info["code"]), headers=headers)


async def hops(request: web.Request) -> web.Response:
    left = int(request.match_info["n"])
    location = f"/hops/{left - 1}" if left > 1 else "/image"
    raise web.HTTPFound(location)


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound(request.query["to"])


async def rebind(request: web.Request) -> web.Response:
    # Same host again, on a new connection, so the name is resolved again.
    response = web.Response(status=302, headers={"Location": f"http://{request.host}/image"})
    response.force_close()
    return response


async def long_header(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = int(request.query["length"])
    await response.prepare(request)
    await response.write(b"x" * 10)
    await request.app[RELEASE].wait()  # a client reading the body would wait here
    return response


async def chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    remaining = int(request.query["size"])
    while remaining > 0:
        piece = min(remaining, 16 * 1024)
        await response.write(b"y" * piece)
        remaining -= piece
    await response.write_eof()
    return response


async def gzipped(request: web.Request) -> web.Response:
    body = gzip.compress(b"\0" * int(request.query["size"]))
    return web.Response(body=body, headers={"Content-Encoding": "gzip"})


async def stall(request: web.Request) -> web.Response:
    await request.app[RELEASE].wait()
    return web.Response(body=IMAGE)


async def stall_body(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = len(IMAGE)
    await response.prepare(request)
    await response.write(IMAGE[:100])
    await request.app[RELEASE].wait()
    return response


async def drip(request: web.Request) -> web.StreamResponse:
    """Headers, then one byte every 0.3 s until the test ends: slow, but never stalled."""
    response = web.StreamResponse()
    response.content_length = len(IMAGE)
    await response.prepare(request)
    release = request.app[RELEASE]
    with contextlib.suppress(ConnectionResetError):  # the client gave up and hung up
        for byte in IMAGE:
            await response.write(bytes([byte]))
            with contextlib.suppress(TimeoutError):  # the origin's drip rate, not a sync
                await asyncio.wait_for(release.wait(), 0.3)
            if release.is_set():
                break
    return response


async def busy_once(request: web.Request) -> web.Response:
    """The first request answers `code` (with `retry_after` when given); later ones, the
    image."""
    if request.app[SEEN].count(request.path) > 1:
        return web.Response(body=IMAGE, content_type="image/jpeg")
    return await status(request)


@web.middleware
async def record(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request.app[SEEN].append(request.path)
    return await handler(request)


@contextlib.asynccontextmanager
async def origin() -> AsyncIterator[TestServer]:
    app = web.Application(middlewares=[record])
    app[RELEASE] = asyncio.Event()
    app[SEEN] = []
    app.router.add_get("/image", image)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/hops/{n}", hops)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/rebind", rebind)
    app.router.add_get("/long-header", long_header)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/stall", stall)
    app.router.add_get("/stall-body", stall_body)
    app.router.add_get("/drip", drip)
    app.router.add_get("/busy/{code}", busy_once)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        yield test_server
    finally:
        app[RELEASE].set()  # let stalled handlers finish so the server closes at once
        await test_server.close()


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    async with origin() as test_server:
        yield test_server


@pytest.fixture
async def other_server() -> AsyncIterator[TestServer]:
    """A second origin: 127.0.0.1 too, on another port."""
    async with origin() as test_server:
        yield test_server


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.time = 1000.0

    def __call__(self) -> float:
        return self.time


SessionFactory = Callable[..., aiohttp.ClientSession]


@pytest.fixture
async def sessions() -> AsyncIterator[SessionFactory]:
    opened: list[aiohttp.ClientSession] = []

    def factory(
        allow: str = "",
        resolver: AbstractResolver | None = None,
        limits: FetchLimits | None = None,
        now: Callable[[], float] | None = None,
        limit_per_host: int = 8,
    ) -> aiohttp.ClientSession:
        # The default inner resolver would ask real DNS: tests always inject one.
        session = make_session(
            FetchAllow.parse(allow),
            limits or FetchLimits(),
            resolver_inner=resolver or ForbiddenResolver(),
            now=now or time.monotonic,
            limit_per_host=limit_per_host,
        )
        opened.append(session)
        return session

    yield factory
    for session in opened:
        await session.close()


def port_of(server: TestServer) -> int:
    assert server.port is not None
    return server.port


def allow_for(server: TestServer) -> str:
    return f"127.0.0.1:{port_of(server)}"


def url(server: TestServer, path: str) -> str:
    return str(server.make_url(path))


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition`, with a deadline, while other tasks run."""

    async def check() -> bool:
        return condition()

    await wait_until_async(check, timeout=5)


async def failure(coroutine: Awaitable[bytes]) -> ImageFailure:
    with pytest.raises(ImageFailure) as caught:
        await coroutine
    return caught.value


# --- success and HTTP status --------------------------------------------------------------


async def test_fetches_bytes(server: TestServer, sessions: SessionFactory) -> None:
    session = sessions(allow_for(server))
    assert await fetch_image(session, url(server, "/image"), FetchLimits()) == IMAGE


async def test_connections_are_kept_alive(
    server: TestServer, sessions: SessionFactory, dialled: list[tuple[str, int]]
) -> None:
    session = sessions(allow_for(server))
    for _ in range(3):
        await fetch_image(session, url(server, "/image"), FetchLimits())
    assert dialled == [("127.0.0.1", server.port)]


async def test_a_fetch_that_may_not_wait_longer_for_a_connection_sends_nothing(
    server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions(allow_for(server), limit_per_host=1)
    holder = asyncio.create_task(fetch_image(session, url(server, "/stall"), FetchLimits()))
    await until(lambda: server.app[SEEN] == ["/stall"])

    with pytest.raises(OriginBusy) as busy:
        await fetch_image(session, url(server, "/image"), FetchLimits(), connection_wait=0.1)

    # The origin's one connection stayed busy: the fetch gave up before sending anything, and
    # asks to come back after a turn (the origin has no time per turn yet: the wait).
    assert server.app[SEEN] == ["/stall"]
    assert busy.value.waited >= 0.1 and busy.value.delay == busy.value.waited
    assert busy.value.origin == ("http", "127.0.0.1", server.port)
    assert origin_key(url(server, "/other")) == busy.value.origin
    server.app[RELEASE].set()
    assert await asyncio.wait_for(holder, 5) == IMAGE
    # With the connection free, the same bounded wait is no wait at all.
    assert (
        await fetch_image(session, url(server, "/image"), FetchLimits(), connection_wait=0.1)
        == IMAGE
    )


@pytest.mark.parametrize("code", [400, 401, 403, 404, 410, 451])
async def test_client_errors_are_permanent(
    server: TestServer, sessions: SessionFactory, code: int
) -> None:
    session = sessions(allow_for(server))
    result = await failure(fetch_image(session, url(server, f"/status/{code}"), FetchLimits()))
    assert result.code is OutcomeCode.HTTP_STATUS
    assert str(code) in result.message
    assert not result.transient


@pytest.mark.parametrize("code", [408, 425, 429, 500, 502, 503, 504])
async def test_retryable_statuses_are_transient(
    server: TestServer, sessions: SessionFactory, code: int
) -> None:
    session = sessions(allow_for(server))
    result = await failure(fetch_image(session, url(server, f"/status/{code}"), FetchLimits()))
    assert result.code is OutcomeCode.HTTP_STATUS
    assert result.transient
    assert result.retry_after is None


async def test_503_with_retry_after(server: TestServer, sessions: SessionFactory) -> None:
    session = sessions(allow_for(server))
    target = url(server, "/status/503?retry_after=7")
    result = await failure(fetch_image(session, target, FetchLimits()))
    assert result.code is OutcomeCode.HTTP_STATUS
    assert result.transient
    assert result.retry_after == 7.0
    assert "503" in str(result)


@pytest.mark.parametrize("code", [200, 204])
async def test_empty_success_bodies_are_returned(
    server: TestServer, sessions: SessionFactory, code: int
) -> None:
    session = sessions(allow_for(server))
    assert await fetch_image(session, url(server, f"/status/{code}"), FetchLimits()) == b""


async def test_status_message_names_the_answer(
    server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions(allow_for(server))
    result = await failure(fetch_image(session, url(server, "/status/404"), FetchLimits()))
    assert result.message == "the image server answered 404 Not Found"
    result = await failure(
        fetch_image(session, url(server, "/status/500?retry_after=3"), FetchLimits())
    )
    assert result.message == (
        "the image server answered 500 Internal Server Error; it asked us to retry in 3 s"
    )


def test_parse_retry_after() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30)), now=now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30)), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None


# --- redirects ----------------------------------------------------------------------------


async def test_redirects_within_the_limit(server: TestServer, sessions: SessionFactory) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(max_redirects=3)
    assert await fetch_image(session, url(server, "/hops/3"), limits) == IMAGE


async def test_too_many_redirects(server: TestServer, sessions: SessionFactory) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(max_redirects=3)
    result = await failure(fetch_image(session, url(server, "/hops/4"), limits))
    assert result.code is OutcomeCode.TOO_MANY_REDIRECTS
    assert not result.transient
    assert result.message == "the image server redirected more than 3 times"


async def test_no_redirects_allowed(server: TestServer, sessions: SessionFactory) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(max_redirects=0)
    assert await fetch_image(session, url(server, "/image"), limits) == IMAGE
    result = await failure(fetch_image(session, url(server, "/hops/1"), limits))
    assert result.code is OutcomeCode.TOO_MANY_REDIRECTS
    assert "redirects are not followed" in result.message


@pytest.mark.parametrize(
    "location",
    [
        "http://10.0.0.1:{port}/image",  # private literal
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[::1]:{port}/image",  # loopback, but only 127.0.0.1:port is allowed
        "http://[::ffff:10.0.0.1]:{port}/image",  # private in IPv4-mapped form
        "http://[::ffff:127.0.0.1]/image",  # loopback in IPv4-mapped form, not allowed port
        "http://127.0.0.1:{other}/image",  # allowed address, other port
        "http://2130706433:{port}/image",  # 127.0.0.1 as a legacy number
        "http://internal.test:{port}/image",  # a name for 10.0.0.5
        "http://metadata.test/computeMetadata/v1/",  # a name for 169.254.169.254
        "http://sneaky.test/image",  # a name for 127.0.0.1, on a port the entry doesn't list
        "file:///etc/passwd",
        "gopher://127.0.0.1:{port}/_x",
        "http://user:secret@127.0.0.1:{port}/image",
    ],
)
async def test_redirect_to_a_blocked_target_is_refused_before_connecting(
    server: TestServer,
    sessions: SessionFactory,
    dialled: list[tuple[str, int]],
    location: str,
) -> None:
    resolver = StaticResolver(
        {
            "internal.test": [["10.0.0.5"]],
            "metadata.test": [["169.254.169.254"]],
            "sneaky.test": [["127.0.0.1"]],
        }
    )
    session = sessions(allow_for(server), resolver)
    target = location.format(port=port_of(server), other=port_of(server) + 1)
    start = str(server.make_url("/redirect").with_query(to=target))

    result = await failure(fetch_image(session, start, FetchLimits()))

    assert result.code is OutcomeCode.BLOCKED_ADDRESS
    assert not result.transient
    assert dialled == [("127.0.0.1", server.port)]  # only the first hop was ever dialled


async def test_every_hop_resolves_again_so_rebinding_is_caught(
    server: TestServer, sessions: SessionFactory, dialled: list[tuple[str, int]]
) -> None:
    # The first answer is allowed; the same name then answers with a private address.
    resolver = StaticResolver({"rebind.test": [["127.0.0.1"], ["10.0.0.5"]]})
    session = sessions("127.0.0.1/32", resolver)

    result = await failure(
        fetch_image(session, f"http://rebind.test:{server.port}/rebind", FetchLimits())
    )

    assert result.code is OutcomeCode.BLOCKED_ADDRESS
    assert resolver.calls == ["rebind.test", "rebind.test"]
    assert dialled == [("127.0.0.1", server.port)]


async def test_a_name_answered_with_mixed_addresses_dials_only_the_allowed_one(
    server: TestServer, sessions: SessionFactory, dialled: list[tuple[str, int]]
) -> None:
    resolver = StaticResolver({"mixed.test": [["10.0.0.5", "169.254.169.254", "127.0.0.1"]]})
    session = sessions(allow_for(server), resolver)
    target = f"http://mixed.test:{server.port}/image"
    assert await fetch_image(session, target, FetchLimits()) == IMAGE
    assert dialled == [("127.0.0.1", server.port)]


async def test_allow_entry_by_host_name(server: TestServer, sessions: SessionFactory) -> None:
    resolver = StaticResolver({"images.test": [["127.0.0.1"]]})
    session = sessions(f"images.test:{server.port}", resolver)
    target = f"http://images.test:{server.port}/hops/2"  # relative redirects stay on the name
    assert await fetch_image(session, target, FetchLimits()) == IMAGE


async def test_allow_entry_by_network_lifts_the_port_rule(
    server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions("127.0.0.0/8")
    assert server.port not in FetchLimits().allowed_ports
    assert await fetch_image(session, url(server, "/image"), FetchLimits()) == IMAGE


# --- refused URLs -------------------------------------------------------------------------


async def test_loopback_without_an_allow_entry_is_blocked(
    server: TestServer, sessions: SessionFactory, dialled: list[tuple[str, int]]
) -> None:
    session = sessions("")
    result = await failure(fetch_image(session, url(server, "/image"), FetchLimits()))
    assert result.code is OutcomeCode.BLOCKED_ADDRESS
    assert dialled == []


async def test_a_name_for_loopback_without_an_allow_entry_is_blocked(
    server: TestServer, sessions: SessionFactory, dialled: list[tuple[str, int]]
) -> None:
    resolver = StaticResolver({"localhost": [["127.0.0.1", "::1"]]})
    session = sessions("", resolver, FetchLimits(allowed_ports=frozenset({port_of(server)})))
    target = f"http://localhost:{server.port}/image"
    result = await failure(fetch_image(session, target, FetchLimits()))
    assert result.code is OutcomeCode.BLOCKED_ADDRESS
    assert resolver.calls == ["localhost"]
    assert dialled == []


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("ftp://files.test/a.jpg", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("data:image/png;base64,AAAA", "scheme"),
        ("http://user:pw@files.test/a.jpg", "credentials"),
        ("http://user@files.test/a.jpg", "credentials"),
        ("http://files.test:2222/a.jpg", "port 2222"),
        ("http://files.test:22/a.jpg", "port 22"),
        ("http:///a.jpg", "host"),
        ("http://127.1/a.jpg", "canonical"),
        ("http://[fe80::1%25eth0]/a.jpg", "not allowed"),
        ("http://0.0.0.0/a.jpg", "not allowed"),
        ("http://[::]/a.jpg", "not allowed"),
        ("http://[::ffff:127.0.0.1]/a.jpg", "not allowed"),
        ("http://[64:ff9b::a9fe:a9fe]/a.jpg", "not allowed"),
    ],
)
async def test_refused_urls_never_resolve_or_connect(
    sessions: SessionFactory, dialled: list[tuple[str, int]], target: str, words: str
) -> None:
    session = sessions("", ForbiddenResolver())
    result = await failure(fetch_image(session, target, FetchLimits()))
    assert result.code is OutcomeCode.BLOCKED_ADDRESS
    assert words in result.message
    assert dialled == []


async def test_fetch_image_needs_a_guarded_session() -> None:
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(TypeError, match="make_session"):
            await fetch_image(plain, "http://127.0.0.1/", FetchLimits())


# --- the connect-time tripwire (what guards webhook POSTs and any other session use) ------


async def test_session_refuses_a_blocked_literal_at_connect_time(
    sessions: SessionFactory, dialled: list[tuple[str, int]]
) -> None:
    session = sessions("")
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await session.post("http://10.0.0.1:8080/hook", data=b"{}")
    assert isinstance(caught.value.os_error, BlockedConnectError)
    result = failure_from_exception(caught.value)
    assert result.code is OutcomeCode.BLOCKED_ADDRESS
    assert result.message.startswith("10.0.0.1 port 8080 is a private, internal")
    assert dialled == []


async def test_session_refuses_a_blocked_name_in_the_resolver(
    sessions: SessionFactory, dialled: list[tuple[str, int]]
) -> None:
    session = sessions("", StaticResolver({"hook.test": [["192.168.1.10"]]}))
    with pytest.raises(ImageFailure) as caught:
        await session.post("http://hook.test/hook", data=b"{}")
    assert caught.value.code is OutcomeCode.BLOCKED_ADDRESS
    assert failure_from_exception(caught.value) is caught.value
    assert dialled == []


async def test_session_reaches_an_allowed_name(
    server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions(f"hook.test:{server.port}", StaticResolver({"hook.test": [["127.0.0.1"]]}))
    async with session.get(f"http://hook.test:{server.port}/image") as response:
        assert await response.read() == IMAGE


# --- size limits --------------------------------------------------------------------------


async def test_content_length_over_the_cap_fails_without_reading(
    server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(max_bytes=1000)
    # The server sends headers and 10 bytes, then waits: reading the body would hang.
    result = await failure(fetch_image(session, url(server, "/long-header?length=1001"), limits))
    assert result.code is OutcomeCode.TOO_LARGE
    assert "1001" in result.message
    assert not result.transient
    assert result.message == "the image is 1001 bytes; the limit is 1000 bytes"


async def test_size_messages_use_binary_units(server: TestServer, sessions: SessionFactory) -> None:
    session = sessions(allow_for(server))
    announced = 50 * 1024 * 1024 + 1
    result = await failure(
        fetch_image(session, url(server, f"/long-header?length={announced}"), FetchLimits())
    )
    assert result.message == "the image is 50.1 MiB; the limit is 50 MiB"
    limits = FetchLimits(max_bytes=20 * 1024)
    result = await failure(fetch_image(session, url(server, "/chunked?size=30000"), limits))
    assert result.message == "the download is larger than the 20 KiB limit"


async def test_streamed_body_over_the_cap(server: TestServer, sessions: SessionFactory) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(max_bytes=100_000)
    result = await failure(fetch_image(session, url(server, "/chunked?size=100001"), limits))
    assert result.code is OutcomeCode.TOO_LARGE


async def test_streamed_body_at_the_cap(server: TestServer, sessions: SessionFactory) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(max_bytes=100_000)
    data = await fetch_image(session, url(server, "/chunked?size=100000"), limits)
    assert data == b"y" * 100_000


async def test_decompressed_size_counts(server: TestServer, sessions: SessionFactory) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(max_bytes=1_000_000)
    result = await failure(fetch_image(session, url(server, "/gzip?size=5000000"), limits))
    assert result.code is OutcomeCode.TOO_LARGE


# --- time and connection failures ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/stall", "/stall-body"])
async def test_stalled_server_times_out(
    server: TestServer, sessions: SessionFactory, path: str
) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(total_timeout=0.5)
    result = await failure(fetch_image(session, url(server, path), limits))
    assert result.code is OutcomeCode.TIMEOUT
    assert result.transient


async def test_a_slow_drip_is_cut_by_the_total_timeout(
    server: TestServer, sessions: SessionFactory
) -> None:
    # A byte every 0.3 s never leaves the connection silent for the 1 s stall limit.
    session = sessions(allow_for(server))
    limits = FetchLimits(stall_timeout=1, total_timeout=1.5)
    result = await failure(fetch_image(session, url(server, "/drip"), limits))
    assert result.code is OutcomeCode.TIMEOUT
    assert result.transient
    assert result.message == "the download took longer than 1.5 s"


async def test_a_body_that_stops_arriving_is_a_stall(
    server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(stall_timeout=0.3, total_timeout=10)
    result = await failure(fetch_image(session, url(server, "/stall-body"), limits))
    assert result.code is OutcomeCode.TIMEOUT
    assert result.transient
    # The stall limit fired, not the 10 s total.
    assert result.message == "the image server stopped sending data for 0.3 s"


async def test_a_server_that_never_answers_times_out(
    server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(stall_timeout=0.3, total_timeout=10)
    result = await failure(fetch_image(session, url(server, "/stall"), limits))
    assert result.code is OutcomeCode.TIMEOUT
    assert result.transient
    assert result.message == "the image server did not answer within 0.3 s"


async def test_the_total_timeout_is_named(server: TestServer, sessions: SessionFactory) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(total_timeout=0.5)  # the default 10 s stall limit never fires
    result = await failure(fetch_image(session, url(server, "/stall"), limits))
    assert result.message == "the download took longer than 0.5 s"


async def test_the_session_has_the_stall_limit(sessions: SessionFactory) -> None:
    assert FetchLimits().stall_timeout == 10.0
    limits = FetchLimits(connect_timeout=2, total_timeout=20, stall_timeout=4)
    timeout = sessions(limits=limits).timeout
    assert (timeout.total, timeout.sock_connect, timeout.sock_read) == (20, 2, 4)


async def test_connection_refused(sessions: SessionFactory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    session = sessions(f"127.0.0.1:{port}")
    result = await failure(fetch_image(session, f"http://127.0.0.1:{port}/", FetchLimits()))
    assert result.code is OutcomeCode.CONNECTION
    assert result.transient
    assert result.message == f"the image server at 127.0.0.1:{port} refused the connection"


async def test_server_hanging_up_is_a_connection_failure(sessions: SessionFactory) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()
        await writer.wait_closed()

    raw = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = raw.sockets[0].getsockname()[1]
    try:
        session = sessions(f"127.0.0.1:{port}")
        result = await failure(fetch_image(session, f"http://127.0.0.1:{port}/", FetchLimits()))
    finally:
        raw.close()
        await raw.wait_closed()
    assert result.code is OutcomeCode.CONNECTION
    assert result.transient
    assert result.message == "the image server closed the connection unexpectedly"


async def test_unknown_name_is_a_connection_failure(sessions: SessionFactory) -> None:
    session = sessions("", StaticResolver({}))
    result = await failure(fetch_image(session, "http://nowhere.test/a.jpg", FetchLimits()))
    assert result.code is OutcomeCode.CONNECTION
    assert result.transient
    assert result.message == "the host name nowhere.test could not be found (DNS)"


# --- 429 and 503: the origin is left alone while its Retry-After lasts ---------------------


async def test_retry_after_holds_back_that_origin_and_no_other(
    server: TestServer, other_server: TestServer, sessions: SessionFactory
) -> None:
    clock = Clock()
    session = sessions(f"{allow_for(server)},{allow_for(other_server)}", now=clock)

    first = await failure(
        fetch_image(session, url(server, "/busy/429?retry_after=2"), FetchLimits())
    )
    assert first.code is OutcomeCode.HTTP_STATUS
    assert (first.transient, first.retry_after) == (True, 2.0)
    assert (
        first.message
        == "the image server answered 429 Too Many Requests; it asked us to retry in 2 s"
    )

    clock.time += 0.5
    second = await failure(fetch_image(session, url(server, "/image"), FetchLimits()))
    assert second.code is OutcomeCode.HTTP_STATUS
    assert second.transient
    assert second.retry_after is not None and 0 < second.retry_after <= 2
    assert second.retry_after == 1.5
    assert second.message == "the image server asked us to slow down; retrying in 2 s"
    assert server.app[SEEN] == ["/busy/429"]  # the second fetch sent nothing

    assert await fetch_image(session, url(other_server, "/image"), FetchLimits()) == IMAGE
    assert other_server.app[SEEN] == ["/image"]


async def test_the_origin_is_asked_again_once_the_wait_is_over(
    server: TestServer, sessions: SessionFactory
) -> None:
    clock = Clock()
    session = sessions(allow_for(server), now=clock)
    target = url(server, "/busy/503?retry_after=2")
    await failure(fetch_image(session, target, FetchLimits()))
    clock.time += 1.5
    waiting = await failure(fetch_image(session, target, FetchLimits()))
    assert waiting.retry_after == 0.5
    clock.time += 0.5
    assert await fetch_image(session, target, FetchLimits()) == IMAGE
    assert server.app[SEEN] == ["/busy/503", "/busy/503"]


@pytest.mark.parametrize("code", [429, 503])
async def test_without_retry_after_the_origin_rests_one_second(
    server: TestServer, sessions: SessionFactory, code: int
) -> None:
    clock = Clock()
    session = sessions(allow_for(server), now=clock)
    first = await failure(fetch_image(session, url(server, f"/busy/{code}"), FetchLimits()))
    assert first.retry_after is None  # the origin did not say; the worker's backoff decides
    second = await failure(fetch_image(session, url(server, "/image"), FetchLimits()))
    assert second.retry_after == 1.0
    clock.time += 1.0
    assert await fetch_image(session, url(server, "/image"), FetchLimits()) == IMAGE


async def test_retry_after_is_capped(server: TestServer, sessions: SessionFactory) -> None:
    clock = Clock()
    session = sessions(allow_for(server), now=clock)
    limits = FetchLimits(max_retry_after=5)
    first = await failure(fetch_image(session, url(server, "/busy/429?retry_after=3600"), limits))
    assert first.retry_after == 5.0
    second = await failure(fetch_image(session, url(server, "/image"), limits))
    assert second.retry_after == 5.0
    assert FetchLimits().max_retry_after == 60.0


async def test_retry_after_as_an_http_date(server: TestServer, sessions: SessionFactory) -> None:
    clock = Clock()
    session = sessions(allow_for(server), now=clock)
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    target = server.make_url("/busy/503").with_query(retry_after=when)
    first = await failure(fetch_image(session, str(target), FetchLimits()))
    assert first.retry_after is not None and 28 < first.retry_after <= 30
    second = await failure(fetch_image(session, url(server, "/image"), FetchLimits()))
    assert second.retry_after == pytest.approx(first.retry_after)


async def test_other_statuses_do_not_hold_the_origin_back(
    server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions(allow_for(server), now=Clock())
    result = await failure(
        fetch_image(session, url(server, "/busy/500?retry_after=30"), FetchLimits())
    )
    assert result.retry_after == 30.0  # passed on to the worker, but no cooldown
    assert await fetch_image(session, url(server, "/image"), FetchLimits()) == IMAGE


async def test_a_redirect_into_a_resting_origin_is_not_sent(
    server: TestServer, other_server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions(f"{allow_for(server)},{allow_for(other_server)}", now=Clock())
    await failure(fetch_image(session, url(other_server, "/busy/429?retry_after=9"), FetchLimits()))
    start = server.make_url("/redirect").with_query(to=url(other_server, "/image"))
    result = await failure(fetch_image(session, str(start), FetchLimits()))
    assert result.retry_after == 9.0
    assert other_server.app[SEEN] == ["/busy/429"]


# --- address classification (no connections) ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "public"),
    [
        ("8.8.8.8", True),
        ("1.1.1.1", True),
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("2a00:1450:4001:80b::200e", True),
        ("::ffff:8.8.8.8", True),  # mapped, public inside
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("127.0.0.1", False),
        ("127.255.255.254", False),
        ("10.0.0.1", False),
        ("10.255.255.255", False),
        ("172.16.0.1", False),
        ("172.31.255.255", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("100.127.255.255", False),
        ("0.0.0.0", False),  # noqa: S104 - classified, never bound
        ("0.1.2.3", False),
        ("192.0.0.170", False),
        ("192.0.2.1", False),
        ("198.18.0.1", False),
        ("198.51.100.1", False),
        ("203.0.113.1", False),
        ("224.0.0.1", False),
        ("239.255.255.250", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::", False),
        ("::1", False),
        ("::127.0.0.1", False),  # IPv4-compatible
        ("fe80::1", False),
        ("fec0::1", False),
        ("fc00::1", False),
        ("fd12:3456:789a::1", False),
        ("ff02::1", False),
        ("100::1", False),
        ("2001:db8::1", False),
        ("3fff::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b:1::808:808", False),  # local-use NAT64, refused outright
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo, refused outright
        ("2001::1", False),
    ],
)
def test_is_public_address(text: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(text)) is public


# --- FetchAllow ---------------------------------------------------------------------------


def test_allow_parse() -> None:
    allow = FetchAllow.parse(
        " 127.0.0.1:8080, [::1]:9000 ,LocalHost.:8081,10.0.0.0/8, fd00::/8,192.168.1.7/24,"
    )
    assert allow.host_ports == frozenset({("127.0.0.1", 8080), ("::1", 9000), ("localhost", 8081)})
    assert allow.networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("192.168.1.0/24"),
    )


def test_allow_parse_empty() -> None:
    assert FetchAllow.parse("") == FetchAllow()
    assert FetchAllow.parse(" , ") == FetchAllow()


@pytest.mark.parametrize(
    "entry",
    [
        "127.0.0.1",
        "localhost",
        "localhost:",
        ":8080",
        "localhost:http",
        "localhost:0",
        "localhost:70000",
        "::1:9000",
        "[::1]9000",
        "[127.0.0.1]:80",
        "[nonsense]:80",
        "bad host:80",
        "10.0.0.0/33",
        "example.test/8",
    ],
)
def test_allow_parse_names_the_bad_entry(entry: str) -> None:
    with pytest.raises(ValueError, match="^" + repr(entry).replace("[", r"\[")):
        FetchAllow.parse(f"127.0.0.1:8080,{entry}")


def test_allow_matches() -> None:
    allow = FetchAllow.parse("127.0.0.1:8080,[::1]:9000,images.test:8081,10.1.0.0/16")
    loopback = ipaddress.ip_address("127.0.0.1")
    assert allow.allows("127.0.0.1", 8080, loopback)
    assert allow.allows("other.test", 8080, loopback)  # the address:port itself is listed
    assert allow.allows(None, 8080, ipaddress.ip_address("::ffff:127.0.0.1"))
    assert not allow.allows("127.0.0.1", 8081, loopback)
    assert allow.allows("::1", 9000, ipaddress.ip_address("::1"))
    assert allow.allows("IMAGES.test.", 8081, ipaddress.ip_address("10.9.9.9"))
    assert not allow.allows(None, 8081, ipaddress.ip_address("10.9.9.9"))
    assert allow.allows(None, 1, ipaddress.ip_address("10.1.2.3"))
    assert not allow.allows(None, 1, ipaddress.ip_address("10.2.0.1"))
    # An IPv4 network never matches an IPv6 address, whatever the integers say.
    assert not FetchAllow.parse("0.0.0.0/0").allows(None, 80, ipaddress.ip_address("::1"))


# --- the resolver on its own --------------------------------------------------------------


async def test_guarded_resolver_filters_and_refuses() -> None:
    inner = StaticResolver(
        {
            "mixed.test": [["10.0.0.5", "93.184.216.34", "fd00::1", "2606:4700::1111"]],
            "private.test": [["10.0.0.5", "fd00::1"]],
        }
    )
    guard = GuardedResolver(FetchAllow(), inner, allowed_ports=frozenset({80, 443}))

    kept = await guard.resolve("mixed.test", 443, socket.AF_UNSPEC)
    assert [answer["host"] for answer in kept] == ["93.184.216.34", "2606:4700::1111"]

    with pytest.raises(ImageFailure) as caught:
        await guard.resolve("private.test", 443)
    assert caught.value.code is OutcomeCode.BLOCKED_ADDRESS

    with pytest.raises(ImageFailure) as caught:
        await guard.resolve("mixed.test", 22)  # public, but not an allowed port
    assert caught.value.code is OutcomeCode.BLOCKED_ADDRESS
    await guard.close()


# --- outcome ------------------------------------------------------------------------------


def test_image_failure_shape() -> None:
    failure_ = ImageFailure(OutcomeCode.HTTP_STATUS, "HTTP 503", transient=True, retry_after=2.0)
    assert str(failure_) == "HTTP_STATUS: HTTP 503"
    copy = pickle.loads(pickle.dumps(failure_))  # noqa: S301 - our own object, round-tripped
    assert (copy.code, copy.message, copy.transient, copy.retry_after) == (
        OutcomeCode.HTTP_STATUS,
        "HTTP 503",
        True,
        2.0,
    )
    assert [code.value for code in OutcomeCode] == [code.name for code in OutcomeCode]


# --- the worker's byte budget -------------------------------------------------------------


async def test_a_known_length_is_reserved_before_the_body_and_the_wait_is_not_timed(
    server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(total_timeout=0.3, stall_timeout=0.3)
    granted = asyncio.Event()
    asked: list[int] = []

    async def reserve(length: int) -> None:
        asked.append(length)
        # The budget is busy for longer than the whole download may take.
        asyncio.get_running_loop().call_later(0.6, granted.set)
        await granted.wait()

    data = await fetch_image(session, url(server, "/image"), limits, reserve=reserve)

    assert data == IMAGE and asked == [len(IMAGE)] and granted.is_set()


def reserve_recorder() -> tuple[list[int], Callable[[int], Awaitable[None]]]:
    """A budget that grants at once, and the amounts it was asked for."""
    asked: list[int] = []

    async def reserve(length: int) -> None:
        asked.append(length)

    return asked, reserve


async def test_a_body_without_length_is_reserved_in_doubling_steps_before_it_is_kept(
    server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions(allow_for(server))
    asked, reserve = reserve_recorder()

    small = await fetch_image(
        session, url(server, "/chunked?size=3000"), FetchLimits(), reserve=reserve
    )
    assert len(small) == 3000 and asked == [RESERVE_STEP]

    asked.clear()
    size = 4 * RESERVE_STEP + 1
    data = await fetch_image(
        session, url(server, f"/chunked?size={size}"), FetchLimits(), reserve=reserve
    )
    assert len(data) == size
    # At least doubling (more when one read brings more), and each step taken only once the
    # one before was not enough: 256 KiB, 512 KiB, 1 MiB, 2 MiB when reads are small.
    assert asked[0] == RESERVE_STEP and all(b >= 2 * a for a, b in itertools.pairwise(asked))
    assert asked[-2] < size <= asked[-1] and len(asked) <= 4


async def test_a_gzip_body_is_reserved_as_it_decodes_not_by_its_length_on_the_wire(
    server: TestServer, sessions: SessionFactory
) -> None:
    # Content-Length counts the compressed bytes: about 1 KiB for a megabyte of zeros.
    session = sessions(allow_for(server))
    asked, reserve = reserve_recorder()

    data = await fetch_image(
        session, url(server, "/gzip?size=1000000"), FetchLimits(), reserve=reserve
    )
    assert len(data) == 1_000_000
    assert asked[0] < 10_000 and asked[-1] >= 1_000_000
    assert asked == sorted(asked)


async def test_reading_pauses_while_the_budget_is_busy_and_the_wait_is_not_timed(
    server: TestServer, sessions: SessionFactory
) -> None:
    session = sessions(allow_for(server))
    limits = FetchLimits(total_timeout=0.3, stall_timeout=0.3)
    granted = asyncio.Event()
    asked: list[int] = []

    async def reserve(length: int) -> None:
        asked.append(length)
        if len(asked) > 1:  # the first step at once, then the budget is busy
            await granted.wait()

    size = 3 * RESERVE_STEP
    fetching = asyncio.create_task(
        fetch_image(session, url(server, f"/chunked?size={size}"), limits, reserve=reserve)
    )

    async def second_step() -> bool:
        return len(asked) == 2

    await wait_until_async(second_step, timeout=5, interval=0.005, message="a second step")
    # Busy for longer than the whole download may take: the fetch waits, reading nothing.
    asyncio.get_running_loop().call_later(0.6, granted.set)
    await asyncio.wait({fetching}, timeout=0.3)
    assert not fetching.done() and asked == [RESERVE_STEP, 2 * RESERVE_STEP]

    data = await fetching
    assert len(data) == size and asked[-1] >= size


# --- turns for an origin's connections ----------------------------------------------------

ORIGIN = URL("https://images.example/a.jpg")


async def test_an_origins_connections_are_taken_in_turns_first_come_first_served() -> None:
    turns = OriginTurns(1)
    order: list[str] = []
    first = asyncio.Event()

    async def fetch(name: str) -> None:
        async with turns.turn(ORIGIN):
            order.append(name)
            if name == "a":
                await first.wait()

    holder = asyncio.create_task(fetch("a"))
    await until(lambda: order == ["a"])
    waiting = [asyncio.create_task(fetch(name)) for name in "bcd"]
    await until(lambda: turns.users(ORIGIN) == 4)  # queued, in the order they were created
    # Another origin is not held up by this one's queue.
    async with turns.turn(URL("https://other.example/a.jpg"), wait=0.01):
        pass
    first.set()
    await asyncio.wait_for(asyncio.gather(holder, *waiting), 5)

    assert order == ["a", "b", "c", "d"]
    assert len(turns) == 0  # nobody uses or waits for an origin: it is forgotten


async def test_a_bounded_wait_reports_the_origins_recent_time_per_turn() -> None:
    clock = Clock()
    turns = OriginTurns(2, now=clock)
    released = asyncio.Event()

    async def hold() -> None:
        async with turns.turn(ORIGIN):
            await released.wait()

    keeper = asyncio.create_task(hold())  # holds one connection throughout
    await until(lambda: turns.users(ORIGIN) == 1)
    for seconds in (4.0, 9.0):  # on the other connection, turns of 4 s and then 9 s
        async with turns.turn(ORIGIN):
            clock.time += seconds
    holder = asyncio.create_task(hold())
    await until(lambda: turns.users(ORIGIN) == 2)

    with pytest.raises(OriginBusy) as busy:
        async with turns.turn(ORIGIN, wait=0.01):
            pytest.fail("a third turn with two connections held")

    # The moving average of the turns: 4 + 0.2 × (9 - 4); the test's clock did not move.
    assert busy.value.delay == pytest.approx(5.0)
    assert busy.value.waited == 0.0
    released.set()
    await asyncio.wait_for(asyncio.gather(keeper, holder), 5)
    assert len(turns) == 0


async def test_a_cancelled_wait_for_a_connection_takes_none() -> None:
    turns = OriginTurns(1)
    released = asyncio.Event()

    async def hold() -> None:
        async with turns.turn(ORIGIN):
            await released.wait()

    holder = asyncio.create_task(hold())
    await until(lambda: len(turns) == 1)
    waiter = asyncio.create_task(hold())
    await until(lambda: turns.users(ORIGIN) == 2)  # waiting for the connection
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    released.set()
    await holder
    async with turns.turn(ORIGIN, wait=0.01):  # the cancelled waiter left nothing held
        pass
    assert len(turns) == 0


async def test_a_wait_that_keeps_waiting_keeps_its_place_in_the_queue() -> None:
    """keep_waiting is asked after each bounded round; saying yes keeps the fetch's place, so a
    fetch queued behind it (unbounded) still comes after it."""
    turns = OriginTurns(1)
    order: list[str] = []
    asked: list[OriginKey] = []
    released = asyncio.Event()

    async def keep_waiting(origin: OriginKey) -> bool:
        asked.append(origin)
        return True

    async def fetch(name: str, wait: float | None = None) -> None:
        async with turns.turn(ORIGIN, wait=wait, keep_waiting=keep_waiting):
            order.append(name)
            if name == "holder":
                await released.wait()

    holder = asyncio.create_task(fetch("holder"))
    await until(lambda: order == ["holder"])
    patient = asyncio.create_task(fetch("patient", wait=0.01))
    await until(lambda: turns.users(ORIGIN) == 2)
    later = asyncio.create_task(fetch("later"))
    await until(lambda: len(asked) >= 3)  # rounds ran out, and it stayed each time
    released.set()
    await asyncio.wait_for(asyncio.gather(holder, patient, later), 5)

    assert order == ["holder", "patient", "later"]
    assert set(asked) == {origin_key(str(ORIGIN))}
    assert len(turns) == 0


async def test_a_wait_that_stops_waiting_raises_origin_busy_and_holds_nothing() -> None:
    turns = OriginTurns(1)
    released = asyncio.Event()
    answers = iter([True, False])

    async def keep_waiting(origin: OriginKey) -> bool:
        return next(answers)

    async def hold() -> None:
        async with turns.turn(ORIGIN):
            await released.wait()

    holder = asyncio.create_task(hold())
    await until(lambda: len(turns) == 1)
    with pytest.raises(OriginBusy) as busy:
        async with turns.turn(ORIGIN, wait=0.01, keep_waiting=keep_waiting):
            pytest.fail("a turn while the only connection is held")
    assert busy.value.waited >= 0.02  # two rounds: one kept, one given up
    released.set()
    await holder
    async with turns.turn(ORIGIN, wait=0.01):  # the one that gave up left nothing held
        pass
    assert len(turns) == 0


async def test_a_connection_that_frees_while_keep_waiting_is_asked_is_taken() -> None:
    turns = OriginTurns(1)
    released = asyncio.Event()
    entered: list[str] = []

    async def release_then_refuse(origin: OriginKey) -> bool:
        released.set()  # the holder lets go while the answer is on its way
        await until(lambda: turns.users(ORIGIN) == 1)
        return False

    async def hold() -> None:
        async with turns.turn(ORIGIN):
            await released.wait()

    holder = asyncio.create_task(hold())
    await until(lambda: len(turns) == 1)
    async with turns.turn(ORIGIN, wait=0.01, keep_waiting=release_then_refuse):
        entered.append("waiter")
    await holder
    assert entered == ["waiter"]
    assert len(turns) == 0


async def test_each_wait_for_a_connection_is_observed_even_one_that_gave_up() -> None:
    clock = Clock()
    waits: list[float] = []
    turns = OriginTurns(1, now=clock, observe=waits.append)
    released = asyncio.Event()

    async def hold() -> None:
        async with turns.turn(ORIGIN):
            await released.wait()

    holder = asyncio.create_task(hold())
    await until(lambda: waits == [0.0])  # a free connection: no wait
    waiter = asyncio.create_task(hold())
    await until(lambda: turns.users(ORIGIN) == 2)
    clock.time += 3.0  # the waiter waits 3 s on the test's clock
    with pytest.raises(OriginBusy):
        async with turns.turn(ORIGIN, wait=0.01):
            pytest.fail("a turn while the only connection is held")
    released.set()
    await asyncio.wait_for(asyncio.gather(holder, waiter), 5)

    # The holder's 0, the one that gave up (at once, on this clock), then the waiter's 3 s.
    assert waits == [0.0, 0.0, 3.0]
