"""Finding 8: an image origin could make a worker hold far more input than its download buffer.

A worker's downloads share one byte budget (`IMGPIPE_WORKER_BUFFER_BYTES`), each holding a
lease until its image is compressed (services/worker/processor.py). Bodies without
Content-Length (chunked) and gzip bodies (whose Content-Length is the compressed size) were
counted only once read whole: 32 of them at 40 MiB each through a 32 MiB budget peaked at
1,417 MB (chunked) and 401 MB (gzip, 40 KB on the wire each) of process RSS, when the worker
also holds its images (the manifests' limit is 1536Mi); after the fix, 170 and 156 MB.

Here the fetches and leases are the worker's own, against a hostile origin on 127.0.0.1, and
the process's Python allocations are traced (the origin runs in a process of its own): what
the downloads hold at their peak.
"""

from __future__ import annotations

import asyncio
import gzip
import select
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator

import pytest
from aiohttp import web

from services.common.fetch import FetchAllow, FetchLimits, fetch_image, make_session
from services.worker.budget import ByteBudget
from testing.stack import ROOT

pytestmark = pytest.mark.security

MiB = 1 << 20
BODY = 16 * MiB
CAPACITY = 4 * MiB
DOWNLOADS = 12
ZEROS = gzip.compress(b"\0" * BODY, 9)  # 16 KiB on the wire


async def chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    piece = b"\0" * (64 * 1024)
    for _ in range(BODY // len(piece)):
        await response.write(piece)
    await response.write_eof()
    return response


async def gzipped(request: web.Request) -> web.Response:
    headers = {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}
    return web.Response(body=ZEROS, headers=headers)


def serve() -> None:
    """The hostile origin, in a process of its own so that its buffers are not traced here;
    prints its port."""

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/chunked/{n}", chunked)
        app.router.add_get("/gzip/{n}", gzipped)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()  # until killed

    asyncio.run(main())


@pytest.fixture(scope="module")
def hostile_port() -> Iterator[int]:
    code = "from tests.security.test_worker_memory import serve; serve()"
    with subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None
            ready, _, _ = select.select([child.stdout], [], [], 30)
            assert ready, "the hostile origin did not start within 30 s"
            yield int(child.stdout.readline())
        finally:
            child.kill()  # by its pid
            child.wait(timeout=10)


@pytest.mark.parametrize("kind", ["chunked", "gzip"])
async def test_bodies_of_unstated_size_stay_within_the_download_buffer(
    hostile_port: int, kind: str
) -> None:
    limits = FetchLimits(max_bytes=2 * BODY)
    session = make_session(FetchAllow.parse(f"127.0.0.1:{hostile_port}"), limits)
    budget = ByteBudget(CAPACITY)

    async def download(n: int) -> int:
        # As Processor._produce: a lease from the fetch until the image is compressed.
        async with budget.lease() as lease:
            url = f"http://127.0.0.1:{hostile_port}/{kind}/{n}"
            data = await fetch_image(session, url, limits, reserve=lease.reserve)
            await lease.settle(len(data))
            await asyncio.sleep(0.02)  # the compress step's time, holding the input
            return len(data)

    tracemalloc.start()
    try:
        sizes = await asyncio.wait_for(
            asyncio.gather(*(download(n) for n in range(DOWNLOADS))), timeout=60
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await session.close()

    assert sizes == [BODY] * DOWNLOADS and budget.used == 0
    # The budget, one body let past it (when every holder waits to grow), that body's copy as
    # its chunks are joined, and what aiohttp has read ahead or inflated on each connection.
    # Measured: 41 MiB (chunked) and 45 (gzip); before the fix 144, about a body per download.
    assert peak < CAPACITY + 2 * BODY + DOWNLOADS * 3 * MiB // 2, f"peak {peak / MiB:.1f} MiB"
