"""The client SDK (imgpipe.client): `Client` (blocking) and `AsyncClient` against a small
gateway stand-in on 127.0.0.1 that answers as the REST API does (gateway/openapi.json).
The real gateway is exercised through the same class by tests/e2e/test_cli.py."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from imgpipe.client import ApiError, AsyncClient, Client, UploadOptions

pytestmark = pytest.mark.unit

ID = "6c0f2a4e-0000-4000-8000-000000000000"
OUTPUT = b"S. No.,Product Name,Input Image Urls,Output Image Urls\n1,a,x,y\n"


@dataclass
class Seen:
    """What the stand-in received."""

    uploads: list[tuple[dict[str, str], bytes, str]] = field(default_factory=list)
    event_streams: int = 0


def stand_in(seen: Seen) -> web.Application:
    def not_found(what: str) -> web.Response:
        body = {"error": {"code": "not_found", "message": f"no {what}", "details": []}}
        return web.json_response(body, status=404)

    async def upload(request: web.Request) -> web.Response:
        body = await request.read()
        seen.uploads.append((dict(request.query), body, request.headers["Authorization"]))
        return web.json_response({"request_id": ID, "status_url": f"/status/{ID}"}, status=202)

    async def status(request: web.Request) -> web.Response:
        if request.match_info["id"] != ID:
            return not_found("request")
        second = request.query.get("page_token") == "p2"
        return web.json_response(
            {
                "request_id": ID,
                "status": "Completed",
                "products": [{"serial_number": "2" if second else "1"}],
                "next_page_token": None if second else "p2",
            }
        )

    async def events(request: web.Request) -> web.StreamResponse:
        seen.event_streams += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if seen.event_streams == 1:  # the first stream drops: the client reconnects
            await response.write(b": keep-alive\n\n" + sse("error", {"code": "unavailable"}))
        else:
            progress = {"progress": {"images_done": 1, "images_failed": 0}}
            await response.write(sse("progress", progress))
            final = {"request_id": ID, "status": "Completed", "output_csv_url": "/o.csv"}
            await response.write(sse("final", final))
        await response.write_eof()
        return response

    async def output(request: web.Request) -> web.Response:
        return web.Response(body=OUTPUT, content_type="text/csv")

    app = web.Application()
    app.router.add_post("/upload", upload)
    app.router.add_get("/status/{id}", status)
    app.router.add_get("/requests/{id}/events", events)
    app.router.add_get("/requests/{id}/output.csv", output)
    return app


def sse(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


@contextlib.contextmanager
def serving(seen: Seen) -> Iterator[str]:
    """The stand-in on its own event loop in a thread, so blocking clients can call it."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(stand_in(seen))
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def gateway(seen: Seen) -> Iterator[str]:
    with serving(seen) as url:
        yield url


def test_the_blocking_client_uploads_follows_and_downloads(
    gateway: str, seen: Seen, tmp_path: Path
) -> None:
    csv = tmp_path / "products.csv"
    csv.write_bytes(b"S. No.,Product Name,Input Image Urls\n1,a,https://x/1.png\n")
    progress: list[dict[str, Any]] = []
    with Client(gateway, api_key="imgpipe_k") as api:
        accepted, created = api.upload(csv, UploadOptions(quality=70, format="webp"))
        assert (accepted["request_id"], created) == (ID, True)
        assert seen.uploads == [({"quality": "70", "format": "webp"}, csv.read_bytes(),
                                 "Bearer imgpipe_k")]  # fmt: skip

        everything = api.status_all(ID)
        assert [p["serial_number"] for p in everything["products"]] == ["1", "2"]

        # The first stream ends with an error event; wait() reconnects and gets to `final`.
        final = api.wait(ID, on_event=progress.append)
        assert final["status"] == "Completed" and seen.event_streams == 2
        assert [p["progress"]["images_done"] for p in progress[:1]] == [1]

        names = [name for name, _ in api.events(ID)]
        assert names == ["progress", "final"]
        first = next(api.events(ID))  # a stream left open is closed with the client
        assert first[0] == "progress"

        out = io.BytesIO()
        assert api.download(ID, out) == len(OUTPUT) and out.getvalue() == OUTPUT

        with pytest.raises(ApiError) as missing:
            api.status("3f1c2a4e-0000-4000-8000-000000000000")
        assert (missing.value.status, missing.value.code) == (404, "not_found")


def test_the_blocking_client_closes_and_says_when_nothing_answers() -> None:
    api = Client("http://127.0.0.1:9", timeout=2)  # discard: nothing listens there
    with pytest.raises(ApiError) as error:
        api.status(ID)
    assert error.value.status is None and error.value.code == "unavailable"
    api.close()
    api.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        api.status(ID)


async def test_the_async_client_has_the_same_calls(gateway: str, seen: Seen) -> None:
    async with AsyncClient(gateway, api_key="imgpipe_k") as api:
        accepted, created = await api.upload(io.BytesIO(b"csv"))
        assert created and accepted["request_id"] == ID
        final = await api.wait(ID)
        assert final["output_csv_url"] == "/o.csv"
    assert seen.uploads[0][1] == b"csv" and seen.event_streams == 2
