"""A request mixing good and hostile URLs: the good images are done, each hostile one fails
under its own code, and no connection ever reaches a blocked address.

The origin misbehaves on purpose; tripwire servers listen where the hostile URLs point (the
loopback spellings, and a redirect to "Redis" on another port) and count every connection.
Everything listens on loopback: no traffic leaves 127.0.0.0/8 and ::1.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import io
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import asyncpg
import pytest
import redis.asyncio
from aiohttp import web
from PIL import Image

from services.common.fetch import FetchAllow, FetchLimits, fetch_image, make_session
from services.common.image_options import ImageLimits
from services.common.outcome import RetryPolicy
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.common.storage import Storage
from services.common.streams import StreamNames, TaskConsumer
from services.worker.processor import Processor
from services.worker.runner import ConsumePolicy, consume
from testing.imagegen import photo_like
from testing.listeners import Tripwire
from testing.polling import wait_until_async
from testing.uploads import csv_of, upload

pytestmark = pytest.mark.integration

LIMITS = FetchLimits(connect_timeout=2.0, total_timeout=3.0, stall_timeout=0.5, max_bytes=2_000_000)


def png_bomb() -> bytes:
    """A valid PNG header claiming 30000×30000 pixels, with a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def many_frames_gif(frames: int) -> bytes:
    # Distinct frames: Pillow merges identical consecutive frames when saving.
    images = [Image.new("RGB", (8, 8), (i * 8 % 256, 0, 0)) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:], duration=10, loop=0)
    return out.getvalue()


@pytest.fixture
async def tripwires() -> AsyncIterator[dict[str, Tripwire]]:
    async with contextlib.AsyncExitStack() as stack:
        yield {
            host: await stack.enter_async_context(Tripwire(host).listening())
            for host in ("127.0.0.1", "127.0.0.2", "::1")
        }


@dataclass
class HostileOrigin:
    port: int
    calls: dict[str, int]
    concurrency: dict[str, int]  # "now" and "peak" requests in flight on /img/

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


_STATIC_BODIES = {
    "/html": (b"<!doctype html><html><body>Not found</body></html>", "image/jpeg"),
    "/logo.svg": (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
        "image/svg+xml",
    ),
}


class _HostileRoutes:
    """The origin's misbehaviours, one handler each; `never` is set at teardown, so hanging
    handlers end."""

    def __init__(self, redis_like_port: int) -> None:
        self.good = photo_like(320, 240, seed=1)
        self.calls: dict[str, int] = {}
        self.concurrency = {"now": 0, "peak": 0}
        self.never = asyncio.Event()
        self.redis_like_port = redis_like_port
        self.static = _STATIC_BODIES | {
            "/truncated": (self.good[: len(self.good) // 2], "image/jpeg"),
            "/bomb.png": (png_bomb(), "image/png"),
            "/frames.gif": (many_frames_gif(30), "image/gif"),
        }

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.count])
        routes = {
            "/img/{name}": self.image,
            "/flaky": self.flaky,
            "/to-redis": self.to_redis,
            "/loop": self.loop,
            "/drip": self.drip,
            "/silent": self.silent,
            "/big-declared": self.big_declared,
            "/big-chunked": self.big_chunked,
        } | {path: self.fixed for path in self.static}
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        return app

    @web.middleware
    async def count(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.calls[request.path] = self.calls.get(request.path, 0) + 1
        return await handler(request)

    async def image(self, request: web.Request) -> web.Response:
        self.concurrency["now"] += 1
        self.concurrency["peak"] = max(self.concurrency["peak"], self.concurrency["now"])
        try:
            await asyncio.sleep(0.05)  # origin latency, so that downloads overlap
            return web.Response(body=self.good, content_type="image/jpeg")
        finally:
            self.concurrency["now"] -= 1

    async def flaky(self, request: web.Request) -> web.Response:
        if self.calls[request.path] == 1:
            return web.Response(status=503, headers={"Retry-After": "1"})
        return web.Response(body=self.good, content_type="image/jpeg")

    async def to_redis(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{self.redis_like_port}/")

    async def loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def drip(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        while not self.never.is_set():
            await response.write(b"\xff")
            await asyncio.sleep(0.1)  # the origin's drip rate, not synchronisation
        return response

    async def silent(self, request: web.Request) -> web.StreamResponse:
        await self.never.wait()
        return web.Response()

    async def big_declared(self, request: web.Request) -> web.Response:
        return web.Response(body=b"\0" * 3_000_000, content_type="image/jpeg")

    async def big_chunked(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(40):
            await response.write(b"\0" * 100_000)
        return response

    async def fixed(self, request: web.Request) -> web.Response:
        body, content_type = self.static[request.path]
        return web.Response(body=body, content_type=content_type)


@pytest.fixture
async def hostile_origin(tripwires: dict[str, Tripwire]) -> AsyncIterator[HostileOrigin]:
    routes = _HostileRoutes(redis_like_port=tripwires["127.0.0.1"].port)
    runner = web.AppRunner(routes.app(), shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield HostileOrigin(runner.addresses[0][1], routes.calls, routes.concurrency)
    finally:
        routes.never.set()
        await runner.cleanup()


@pytest.fixture
async def guarded_processor(
    hostile_origin: HostileOrigin,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    storage: Storage,
) -> AsyncIterator[Processor]:
    # Only the origin is allowed; the tripwires are not.
    session = make_session(FetchAllow.parse(f"127.0.0.1:{hostile_origin.port}"), LIMITS)
    with ThreadPoolExecutor(2) as executor:
        try:
            fetch = functools.partial(fetch_image, session, limits=LIMITS)
            yield Processor(
                pool=pool,
                redis=redis_client,
                names=names,
                storage=storage,
                fetch=fetch,
                executor=executor,
                image_limits=ImageLimits(max_pixels=50_000_000, max_frames=10),
                retry=RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.05, max_wait=2),
            )
        finally:
            await session.close()


async def test_good_and_hostile_urls_in_one_request(
    ingest_stub: ingest_grpc.IngestServiceAsyncStub,
    status_stub: status_grpc.StatusServiceAsyncStub,
    guarded_processor: Processor,
    consumer: TaskConsumer,
    hostile_origin: HostileOrigin,
    tripwires: dict[str, Tripwire],
    pool: asyncpg.Pool,
    storage: Storage,
) -> None:
    o = hostile_origin
    wire4, wire2, wire6 = (tripwires[h].port for h in ("127.0.0.1", "127.0.0.2", "::1"))
    expected = {
        o.url("/img/a.jpg"): None,
        o.url("/flaky"): None,  # 503 once, then fine: a transient failure is retried
        o.url("/img/b.jpg"): None,
        o.url("/to-redis"): "BLOCKED_ADDRESS",
        f"http://localhost:{wire4}/x.jpg": "BLOCKED_ADDRESS",
        f"http://127.0.0.2:{wire2}/x.jpg": "BLOCKED_ADDRESS",
        f"http://[::1]:{wire6}/x.jpg": "BLOCKED_ADDRESS",
        f"http://0.0.0.0:{wire4}/x.jpg": "BLOCKED_ADDRESS",
        f"http://[::ffff:127.0.0.1]:{wire4}/x.jpg": "BLOCKED_ADDRESS",
        f"http://2130706433:{wire4}/x.jpg": "BLOCKED_ADDRESS",
        o.url("/loop"): "TOO_MANY_REDIRECTS",
        o.url("/drip"): "TIMEOUT",
        o.url("/silent"): "TIMEOUT",
        o.url("/big-declared"): "TOO_LARGE",
        o.url("/big-chunked"): "TOO_LARGE",
        o.url("/html"): "NOT_AN_IMAGE",
        o.url("/truncated"): "CORRUPT_IMAGE",
        o.url("/bomb.png"): "DECOMPRESSION_BOMB",
        o.url("/frames.gif"): "DECOMPRESSION_BOMB",
        o.url("/logo.svg"): "UNSUPPORTED_FORMAT",
        o.url("/missing"): "HTTP_STATUS",
    }
    urls = list(expected)
    rows = [(str(i + 1), f"Product {i + 1}", urls[i : i + 3]) for i in range(0, len(urls), 3)]
    accepted = await upload(ingest_stub, csv_of(rows), chunk_size=512)

    stop = asyncio.Event()
    worker = asyncio.create_task(
        consume(consumer, guarded_processor, ConsumePolicy(concurrency=8), stop)
    )
    try:

        async def final() -> asyncpg.Record | None:
            row = await pool.fetchrow(
                "SELECT * FROM requests WHERE id = $1::uuid", accepted.request_id
            )
            return row if row and row["status"] in ("Completed", "Failed") else None

        request = await wait_until_async(final, timeout=60, message="request final")
    finally:
        stop.set()
        await asyncio.wait_for(worker, timeout=15)

    assert request["status"] == "Completed"
    good = sum(1 for code in expected.values() if code is None)
    assert (request["images_done"], request["images_failed"]) == (good, len(expected) - good)

    outcomes = {
        r["input_url"]: r
        for r in await pool.fetch(
            "SELECT * FROM images WHERE request_id = $1::uuid", accepted.request_id
        )
    }
    assert {url: r["error_code"] for url, r in outcomes.items()} == expected
    assert outcomes[o.url("/flaky")]["attempts"] == 2  # 503 + Retry-After, then success
    assert o.calls["/missing"] == 1  # permanent: not retried
    assert all(r["error_message"] for r in outcomes.values() if r["error_code"])

    # No connection ever reached a blocked address, asserted where it would have arrived.
    assert {host: wire.accepted for host, wire in tripwires.items()} == {
        "127.0.0.1": 0,
        "127.0.0.2": 0,
        "::1": 0,
    }
    assert o.calls["/to-redis"] == 1 and o.calls["/flaky"] == 2

    # The status API and the output CSV show the codes.
    errors: dict[str, str] = {}
    token = ""
    while True:
        page = await status_stub.ListProducts(
            status_pb.ListProductsRequest(request_id=accepted.request_id, page_token=token),
            timeout=5,
        )
        errors |= {e.url: e.code for p in page.products for e in p.errors}
        if not (token := page.next_page_token):
            break
    assert errors == {url: code for url, code in expected.items() if code}
    table = list(csv.reader(io.StringIO((await storage.get(request["output_csv_key"])).decode())))
    listed = {
        entry.rsplit(": ", 1)[0]: entry.rsplit(": ", 1)[1]
        for row in table[1:]
        for entry in row[4].split("; ")
        if entry
    }
    assert listed == errors


async def test_fetches_to_one_origin_share_its_connection_limit(
    hostile_origin: HostileOrigin,
) -> None:
    """The per-host limit: eight concurrent downloads from one origin use at most two
    connections when the limit is two."""
    session = make_session(
        FetchAllow.parse(f"127.0.0.1:{hostile_origin.port}"), LIMITS, limit_per_host=2
    )
    try:
        results = await asyncio.gather(
            *(fetch_image(session, hostile_origin.url(f"/img/{i}.jpg"), LIMITS) for i in range(8))
        )
        assert all(results)
        assert hostile_origin.concurrency["peak"] == 2  # measured at the origin
    finally:
        await session.close()
