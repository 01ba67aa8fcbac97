"""A local image origin on 127.0.0.1 for tests and benchmarks.

`/img/<name>` serves a generated photo (made on first request, then the same bytes),
`/chunked/<name>` the same in 16 KiB chunks without Content-Length, `/text` serves text that
is not an image, anything else is 404. `delay` adds origin latency; `hits` counts the requests
for each image path; a path in `gates` is answered once its event is set, one in `unavailable`
with 503 and each Retry-After listed, one per request, before it is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from aiohttp import web

from testing.imagegen import photo_like

_SEEDS = itertools.count()


@dataclass
class ImageOrigin:
    port: int
    size: tuple[int, int]
    served: dict[str, bytes] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)  # paths answered 404 for now
    # path: the Retry-After seconds of its next requests, one each, answered 503
    unavailable: dict[str, list[int]] = field(default_factory=dict)
    # (path, time.monotonic()) of every image request, when it arrived
    hits: list[tuple[str, float]] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)  # path: answered once set

    def hits_of(self, url: str) -> int:
        """How many times `url` of this origin was requested."""
        path = url.removeprefix(f"http://127.0.0.1:{self.port}")
        return sum(1 for hit, _ in self.hits if hit == path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def source(self, url: str) -> bytes:
        """The bytes this origin served for `url`."""
        return self.served[url.removeprefix(f"http://127.0.0.1:{self.port}")]

    def image(self, path: str) -> bytes:
        if path not in self.served:
            # A seed of its own for every image any origin of the process makes: tests share a
            # database, and equal bytes would be reused from another test's output.
            self.served[path] = photo_like(*self.size, seed=next(_SEEDS))
        return self.served[path]


@contextlib.asynccontextmanager
async def serve_images(
    size: tuple[int, int] = (800, 600), *, delay: float = 0.0
) -> AsyncIterator[ImageOrigin]:
    origin = ImageOrigin(port=0, size=size)

    async def image(request: web.Request) -> web.Response:
        origin.hits.append((request.path, time.monotonic()))
        if waits := origin.unavailable.get(request.path):
            return web.Response(status=503, headers={"Retry-After": str(waits.pop(0))})
        if request.path in origin.gates:
            await origin.gates[request.path].wait()
        if delay:
            await asyncio.sleep(delay)  # simulated origin latency, not synchronisation
        if request.path in origin.missing:
            raise web.HTTPNotFound()
        return web.Response(body=origin.image(request.path), content_type="image/jpeg")

    async def chunked(request: web.Request) -> web.StreamResponse:
        origin.hits.append((request.path, time.monotonic()))
        body = origin.image(request.path)
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 16 * 1024):
            await response.write(body[start : start + 16 * 1024])
        await response.write_eof()
        return response

    async def text(request: web.Request) -> web.Response:
        return web.Response(text="not an image")

    app = web.Application()
    app.router.add_get("/img/{name}", image)
    app.router.add_get("/chunked/{name}", chunked)
    app.router.add_get("/text", text)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    origin.port = runner.addresses[0][1]
    try:
        yield origin
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def serve_images_in_thread(
    size: tuple[int, int] = (800, 600), *, delay: float = 0.0
) -> Iterator[ImageOrigin]:
    """serve_images() on an event loop of its own, in a thread: for a fixture that outlives
    one test (each test runs on a loop of its own, which stops between tests)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="image-origin", daemon=True)
    thread.start()
    serving = serve_images(size, delay=delay)
    try:
        origin = asyncio.run_coroutine_threadsafe(serving.__aenter__(), loop).result(timeout=30)
        try:
            yield origin
        finally:
            stop = serving.__aexit__(None, None, None)
            asyncio.run_coroutine_threadsafe(stop, loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@contextlib.asynccontextmanager
async def held_origin() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """An image origin whose answers wait until the event is set."""
    release = asyncio.Event()

    async def image(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(body=photo_like(64, 48), content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/img/{name}", image)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1], release
    finally:
        release.set()
        await runner.cleanup()


def image_urls(origin: ImageOrigin, count: int, tag: str) -> list[str]:
    """`count` distinct image URLs on the origin, their images generated now rather than while
    the workers fetch them."""
    paths = [f"/img/{tag}-{i}.jpg" for i in range(count)]
    for path in paths:
        origin.image(path)
    return [origin.url(path) for path in paths]
