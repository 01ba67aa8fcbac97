"""The gateway's error answers: every failure is the documented JSON error, never a trace.

Ingest and status are "down" (their addresses are closed ports) unless a test starts the small
in-process ingest below, which only stands in for ingest where streaming needs a reader on the
other end. The end-to-end behaviour with the real services is tested in tests/e2e.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from gateway import upload
from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.http_errors import error_middleware
from gateway.keys import IN_FLIGHT
from gateway.observability import observe_middleware
from gateway.serving import drain, start
from services.common import initial_metadata
from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import request_pb2, task_pb2
from services.common.storage import StorageConfig
from testing.gateway import GatewayServer
from testing.polling import wait_until_async

pytestmark = pytest.mark.integration

Client = TestClient[web.Request, web.Application]

LIMIT = 1024
CSV = b"S. No.,Product Name,Input Image Urls\n1,Shoe,https://example.com/a.jpg\n"
SECRET = b"outside the store"


def closed_port() -> int:
    """A port nothing listens on: bound by us, then released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class FakeIngest(ingest_grpc.IngestServiceServicer):
    """Stands in for ingest: accepts every upload it reads to the end, records what it got."""

    headers: list[ingest_pb.UploadHeader] = field(default_factory=list)
    completed: list[bytes] = field(default_factory=list)
    received_header: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # Cleared by a test to hold uploads after their last chunk until the client goes away.
    commit: asyncio.Event = field(default_factory=asyncio.Event)
    legacy: bool = False  # set by a test: an ingest from before the go-ahead (a rolling update)

    def __post_init__(self) -> None:
        self.commit.set()

    async def UploadCsv(
        self, request_iterator: AsyncIterator[ingest_pb.UploadCsvRequest], context: Any
    ) -> ingest_pb.UploadCsvResponse:
        body = bytearray()
        try:
            async for message in request_iterator:
                if message.HasField("header"):
                    self.headers.append(message.header)
                    self.received_header.set()
                    if not self.legacy:
                        await initial_metadata.ready(context)  # as ingest does: send the file
                else:
                    body += message.chunk
            # A client's cancel can end the request stream like a half-close would; only the
            # next await tells them apart, by raising CancelledError.
            await self.commit.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.completed.append(bytes(body))
        return ingest_pb.UploadCsvResponse(
            accepted=ingest_pb.Accepted(
                request_id="req-1",
                status=request_pb2.REQUEST_STATUS_PENDING,
                products=1,
                images=1,
                created=True,
            )
        )

    async def RetryFailedImages(
        self, request: ingest_pb.RetryFailedImagesRequest, context: Any
    ) -> ingest_pb.RetryFailedImagesResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of this stand-in")
        raise AssertionError("unreachable")

    async def SubmitProducts(
        self, request_iterator: AsyncIterator[ingest_pb.SubmitProductsRequest], context: Any
    ) -> ingest_pb.SubmitProductsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")
        raise AssertionError("abort returned")

    async def wait_cancelled(self) -> None:
        async with asyncio.timeout(10):
            await self.cancelled.wait()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A file:// store, with a secret next to it and a symlink inside it pointing at the secret."""
    (tmp_path / "secret.txt").write_bytes(SECRET)
    root = tmp_path / "store"
    root.mkdir()
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    return root


def settings_for(store: Path, ingest_addr: str = "") -> GatewaySettings:
    return GatewaySettings(
        ingest_addr=ingest_addr or f"127.0.0.1:{closed_port()}",
        status_addr=f"127.0.0.1:{closed_port()}",
        storage=StorageConfig(store.as_uri()),
        max_upload_bytes=LIMIT,
        rpc_timeout=2,
        upload_timeout=5,
    )


async def serve(settings: GatewaySettings) -> AsyncIterator[Client]:
    server = GatewayServer(create_app(settings), host="127.0.0.1")
    async with TestClient(server) as client:
        yield client


@pytest.fixture
async def client(store: Path) -> AsyncIterator[Client]:
    async for each in serve(settings_for(store)):
        yield each


@pytest.fixture
async def fake_ingest() -> AsyncIterator[tuple[FakeIngest, str]]:
    servicer = FakeIngest()
    server = grpc.aio.server()
    ingest_grpc.add_IngestServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def client_with_ingest(
    store: Path, fake_ingest: tuple[FakeIngest, str]
) -> AsyncIterator[Client]:
    async for each in serve(settings_for(store, ingest_addr=fake_ingest[1])):
        yield each


async def error_of(response: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    """The error object of a JSON error answer, after checking its status, code and shape."""
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "Traceback" not in error["message"]
    assert isinstance(error["details"], list)
    return error


def csv_form(*fields: tuple[str, str], after: tuple[tuple[str, str], ...] = ()) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields:
        form.add_field(name, value)
    form.add_field("file", CSV, filename="products.csv", content_type="text/csv")
    for name, value in after:
        form.add_field(name, value)
    return form


FORM_BOUNDARY = "imgpipe-test-boundary"
FORM_TYPE = f"multipart/form-data; boundary={FORM_BOUNDARY}"
FORM_END = f"--{FORM_BOUNDARY}--\r\n".encode()


def form_part(name: str, value: bytes, filename: str = "") -> bytes:
    """One multipart/form-data part, for bodies a test sends piece by piece."""
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"--{FORM_BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n"
    return head.encode() + value + b"\r\n"


# A body of a declared length, and a chunked one (its first chunk is 9 bytes).
FRAMINGS = ["Content-Length: 1000\r\n\r\n", "Transfer-Encoding: chunked\r\n\r\n9\r\n"]


async def stalled_upload(
    client: Client, framing: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw POST /upload that sent its headers (ending with `framing`) and the start of a
    body, then nothing more."""
    assert client.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    head = f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/csv\r\n{framing}"
    writer.write(head.encode() + b"S. No.,x\n")
    await writer.drain()
    return reader, writer


# -- backends down --------------------------------------------------------------------------


async def test_upload_csv_body_with_ingest_down_is_503(client: Client) -> None:
    response = await client.post("/upload", data=CSV, headers={"Content-Type": "text/csv"})
    error = await error_of(response, 503, "unavailable")
    assert "127.0.0.1" not in error["message"]


async def test_upload_multipart_with_ingest_down_is_503(client: Client) -> None:
    response = await client.post("/upload", data=csv_form(("quality", "80")))
    await error_of(response, 503, "unavailable")


@pytest.mark.parametrize(
    "path", ["/status?request_id=abc", "/status/abc", "/requests/abc/output.csv"]
)
async def test_status_reads_with_status_down_are_503(client: Client, path: str) -> None:
    await error_of(await client.get(path), 503, "unavailable")


async def test_readyz_names_the_backends_that_are_down(client: Client) -> None:
    error = await error_of(await client.get("/readyz"), 503, "unavailable")
    assert {detail["column"] for detail in error["details"]} == {"ingest", "status"}


async def test_the_tests_gateway_is_served_with_productions_runner_options(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """testing/gateway.py: aiohttp's TestServer would log this request with aiohttp's own
    access logger, query values included."""
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        response = await client.get("/healthz", params={"page_token": "SECRET"})
        assert response.status == 200

        async def logged() -> list[logging.LogRecord] | None:
            return [r for r in caplog.records if r.name == "aiohttp.access"] or None

        [record] = await wait_until_async(logged, message="the access line")
    assert '"GET /healthz?page_token HTTP/1.1" 200' in record.getMessage()


async def test_healthz_answers_while_backends_are_down(client: Client) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream"])
async def test_upload_of_another_media_type_is_415(client: Client, content_type: str) -> None:
    response = await client.post("/upload", data=b"{}", headers={"Content-Type": content_type})
    await error_of(response, 415, "unsupported_media_type")


async def test_upload_declared_over_the_limit_is_413_before_reading(client: Client) -> None:
    response = await client.post(
        "/upload", data=b"x" * (LIMIT + 1), headers={"Content-Type": "text/csv"}
    )
    error = await error_of(response, 413, "too_large")
    assert str(LIMIT) in error["message"]


async def test_upload_streamed_over_the_limit_is_413_and_cancelled(
    client_with_ingest: Client, fake_ingest: tuple[FakeIngest, str]
) -> None:
    servicer = fake_ingest[0]
    servicer.commit.clear()

    async def body() -> AsyncIterator[bytes]:
        # Sent without Content-Length (chunked), so only the count while streaming can stop it.
        # The client sends its request headers with the first chunk: send one, then wait.
        yield CSV
        await servicer.received_header.wait()
        for _ in range(8):
            yield b"x" * (LIMIT // 4)

    response = await client_with_ingest.post(
        "/upload", data=body(), headers={"Content-Type": "text/csv"}
    )
    error = await error_of(response, 413, "too_large")
    assert str(LIMIT) in error["message"]
    # The call was cancelled, not half-closed: ingest cannot take the first KiB as a whole file.
    await servicer.wait_cancelled()
    assert servicer.completed == []


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_caller_leaving_mid_upload_cancels_the_ingest_call(
    client_with_ingest: Client, fake_ingest: tuple[FakeIngest, str], framing: str
) -> None:
    servicer = fake_ingest[0]
    servicer.commit.clear()
    _, writer = await stalled_upload(client_with_ingest, framing)
    await servicer.received_header.wait()
    writer.close()
    await writer.wait_closed()
    # A truncated body must never reach ingest as a complete (shorter) file.
    await servicer.wait_cancelled()
    assert servicer.completed == []


async def test_a_client_gone_mid_answer_is_499_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What aiohttp raises when the gateway reads an upload or writes a live-progress event or
    a download to a client that went away: the caller's doing, not an "unhandled error"."""

    async def gone(request: web.Request) -> web.Response:
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/gone", gone)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/gone")
        assert response.status == 499
        assert (await response.json())["error"]["code"] == "client_closed_request"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_the_served_gateway_cancels_a_handler_whose_client_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """gateway/serving.py's runner, not TestServer (which always cancels): a quiet live stream
    must not hold its lease until its next keep-alive write. Its access line says 499."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def quiet(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b": open\n\n")
        started.set()
        try:
            await asyncio.Event().wait()  # as a stream with no news
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return response

    app = web.Application(middlewares=[observe_middleware])
    app.router.add_get("/quiet", quiet)
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    runner = await start(app, "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /quiet HTTP/1.1\r\nHost: gateway\r\n\r\n")
        await reader.readuntil(b": open\n\n")
        await asyncio.wait_for(started.wait(), timeout=10)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), timeout=5)  # a deadline: KEEPALIVE is 15 s
    finally:
        await runner.cleanup()
    logged = [r for r in caplog.records if r.name == "aiohttp.access"]
    assert [(r.method, r.target, r.status) for r in logged] == [("GET", "/quiet", 499)]  # type: ignore[attr-defined]


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_an_upload_body_that_stops_arriving_is_408(
    store: Path, fake_ingest: tuple[FakeIngest, str], framing: str
) -> None:
    servicer = fake_ingest[0]
    servicer.commit.clear()
    settings = replace(settings_for(store, fake_ingest[1]), upload_idle_timeout=0.5)
    async for client in serve(settings):
        reader, writer = await stalled_upload(client, framing)
        try:
            async with asyncio.timeout(30):  # a deadline, not a measurement
                head_and_body = await reader.readuntil(b"}}")
        finally:
            writer.close()
        assert head_and_body.startswith(b"HTTP/1.1 408 "), head_and_body
        assert b"Connection: close\r\n" in head_and_body
        assert b"IMGPIPE_UPLOAD_IDLE_TIMEOUT=0.5" in head_and_body
        await servicer.wait_cancelled()
        assert servicer.completed == []


async def test_without_keys_each_address_has_its_own_uploads_cap(
    store: Path, fake_ingest: tuple[FakeIngest, str]
) -> None:
    servicer = fake_ingest[0]
    settings = replace(settings_for(store, fake_ingest[1]), anonymous_uploads=1)
    async for client in serve(settings):
        _, writer = await stalled_upload(client, FRAMINGS[0])
        async with asyncio.timeout(30):
            await servicer.received_header.wait()
        response = await client.post("/upload", data=CSV, headers={"Content-Type": "text/csv"})
        error = await error_of(response, 429, "rate_limited")
        assert error["details"][0]["column"] == "uploads"
        assert "IMGPIPE_LIMIT_UPLOADS=1" in error["message"]
        assert int(response.headers["Retry-After"]) >= 1
        writer.close()
        await writer.wait_closed()

        await wait_until_async(
            functools.partial(accepted, client), timeout=30, message="the slot given back"
        )


async def accepted(client: Client) -> bool:
    response = await client.post("/upload", data=CSV, headers={"Content-Type": "text/csv"})
    return response.status == 202


@pytest.mark.parametrize("route", ["/upload", "/ui/upload"])
@pytest.mark.parametrize("encoding", ["gzip", "identity"])
async def test_an_encoded_upload_is_415(client: Client, route: str, encoding: str) -> None:
    response = await client.post(
        route,
        data=gzip.compress(CSV) if encoding == "gzip" else CSV,
        headers={"Content-Type": "text/csv", "Content-Encoding": encoding},
    )
    assert response.status == 415
    assert "Content-Encoding" in await response.text()


async def test_an_unknown_form_field_is_400_naming_it(client: Client) -> None:
    form = csv_form(("quality", "80"), ("colour", "red"))
    error = await error_of(await client.post("/upload", data=form), 400, "invalid_argument")
    assert error["details"][0]["column"] == "colour"
    assert "unknown form field 'colour'" in error["message"]


@pytest.mark.parametrize(
    ("query", "field_name"),
    [
        ("quality=abc", "quality"),
        ("quality=0", "quality"),
        ("quality=96", "quality"),
        ("quality=1.5", "quality"),
        ("format=gif", "format"),
        ("effort=slow", "effort"),
        ("target_ratio=1", "target_ratio"),
        ("target_ratio=-0.5", "target_ratio"),
        ("target_ratio=half", "target_ratio"),
        ("target_ratio=inf", "target_ratio"),
        ("min_ssim=1.01", "min_ssim"),
        ("min_ssim=nan", "min_ssim"),
        ("target_ratio=0.5&min_ssim=0.9", "min_ssim"),
        ("target_ratio=0.5&format=png", "target_ratio"),
        ("min_ssim=0.9&format=auto", "min_ssim"),
        ("format=auto%2Bavif", "format"),
        ("scale=0", "scale"),
        ("scale=1.5", "scale"),
        ("scale=nan", "scale"),
        ("max_width=-1", "max_width"),
        ("max_height=wide", "max_height"),
    ],
)
async def test_upload_with_a_bad_option_is_400(client: Client, query: str, field_name: str) -> None:
    response = await client.post(f"/upload?{query}", data=CSV, headers={"Content-Type": "text/csv"})
    error = await error_of(response, 400, "invalid_argument")
    assert [detail["column"] for detail in error["details"]] == [field_name]
    assert field_name in error["message"]


async def test_upload_lists_every_bad_option_at_once(client: Client) -> None:
    form = csv_form(("quality", "high"), ("scale", "2"))
    error = await error_of(await client.post("/upload", data=form), 400, "invalid_argument")
    assert {detail["column"] for detail in error["details"]} == {"quality", "scale"}


async def test_multipart_without_a_file_is_400(client: Client) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("quality", "80")
    form.add_field("format", "webp")
    error = await error_of(await client.post("/upload", data=form), 400, "invalid_argument")
    assert error["details"][0]["column"] == "file"


@pytest.mark.parametrize("route", ["/upload", "/ui/upload"])
async def test_a_malformed_part_header_is_400_not_500(client: Client, route: str) -> None:
    body = f"--{FORM_BOUNDARY}\r\nthis line is no header\r\n\r\nx\r\n".encode() + FORM_END
    response = await client.post(route, data=body, headers={"Content-Type": FORM_TYPE})
    assert response.status == 400, await response.text()


async def test_option_after_the_file_is_400_and_cancelled(
    client_with_ingest: Client, fake_ingest: tuple[FakeIngest, str]
) -> None:
    servicer = fake_ingest[0]
    servicer.commit.clear()

    async def body() -> AsyncIterator[bytes]:
        yield form_part("file", CSV, filename="products.csv")
        # Only once the upload to ingest has begun does the late option field arrive.
        await servicer.received_header.wait()
        yield form_part("quality", b"80") + FORM_END

    response = await client_with_ingest.post(
        "/upload", data=body(), headers={"Content-Type": FORM_TYPE}
    )
    error = await error_of(response, 400, "invalid_argument")
    assert "before" in error["message"]
    assert error["details"][0]["column"] == "quality"
    await servicer.wait_cancelled()
    assert servicer.completed == []


async def test_an_ingest_from_before_the_go_ahead_still_gets_the_file(
    client_with_ingest: Client, fake_ingest: tuple[FakeIngest, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # During a rolling update a new gateway may call an ingest that never says it is ready.
    monkeypatch.setattr(upload, "LEGACY_INGEST_WAIT", 0.2)
    servicer = fake_ingest[0]
    servicer.legacy = True
    response = await client_with_ingest.post(
        "/upload", data=CSV, headers={"Content-Type": "text/csv"}
    )
    assert response.status == 202, await response.text()
    assert servicer.completed == [CSV]


async def test_options_before_the_file_and_in_the_query_reach_ingest(
    client_with_ingest: Client, fake_ingest: tuple[FakeIngest, str]
) -> None:
    form = csv_form(
        ("quality", "80"), ("format", "webp"), ("effort", "max"), ("target_ratio", "0.5")
    )
    response = await client_with_ingest.post(
        "/upload?scale=0.5&max_width=640",
        data=form,
        headers={"Idempotency-Key": "key-1"},
    )
    assert response.status == 202
    body = await response.json()
    assert body == {
        "request_id": "req-1",
        "status": "Pending",
        "products": 1,
        "images": 1,
        # No IMGPIPE_PUBLIC_API_URL and no trusted proxy: a path, never the Host header's.
        "status_url": "/status/req-1",
    }
    assert response.headers["Location"] == "/status/req-1"
    servicer = fake_ingest[0]
    assert servicer.completed == [CSV]
    [header] = servicer.headers
    assert header.idempotency_key == "key-1"
    assert header.options == task_pb2.ImageOptions(
        quality=80,
        format=task_pb2.OUTPUT_FORMAT_WEBP,
        effort=task_pb2.EFFORT_MAX,
        target_ratio=0.5,
        scale=0.5,
        max_width=640,
    )


async def test_min_ssim_and_avif_in_the_query_reach_ingest(
    client_with_ingest: Client, fake_ingest: tuple[FakeIngest, str]
) -> None:
    response = await client_with_ingest.post(
        "/upload?format=avif&min_ssim=0.95", data=CSV, headers={"Content-Type": "text/csv"}
    )
    assert response.status == 202
    header = fake_ingest[0].headers[-1]
    assert header.options == task_pb2.ImageOptions(
        format=task_pb2.OUTPUT_FORMAT_AVIF, min_ssim=0.95
    )


@pytest.mark.parametrize("page_size", ["abc", "0", "1001", "-5", "10.5"])
async def test_status_with_a_bad_page_size_is_400(client: Client, page_size: str) -> None:
    response = await client.get(f"/status/abc?page_size={page_size}")
    error = await error_of(response, 400, "invalid_argument")
    assert error["details"][0]["column"] == "page_size"


@pytest.mark.parametrize("path", ["/status", "/status?request_id=", "/status?request_id=%20"])
async def test_status_without_a_request_id_is_400(client: Client, path: str) -> None:
    error = await error_of(await client.get(path), 400, "invalid_argument")
    assert error["details"][0]["column"] == "request_id"


# -- routing --------------------------------------------------------------------------------


async def test_unknown_route_is_json_404(client: Client) -> None:
    await error_of(await client.get("/nowhere"), 404, "not_found")


async def test_wrong_method_is_json_405_with_allow(client: Client) -> None:
    response = await client.get("/upload")
    await error_of(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


# -- /files/ --------------------------------------------------------------------------------


async def test_files_serves_an_object_of_the_store(client: Client, store: Path) -> None:
    image = store / "requests" / "r1" / "images" / "1.jpg"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"\xff\xd8\xff fake jpeg")
    response = await client.get("/files/requests/r1/images/1.jpg")
    assert response.status == 200
    assert response.content_type == "image/jpeg"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert await response.read() == b"\xff\xd8\xff fake jpeg"


async def test_files_missing_object_is_json_404(client: Client) -> None:
    await error_of(await client.get("/files/requests/none.jpg"), 404, "not_found")


@pytest.mark.parametrize(
    "raw_path",
    [
        "/files/../secret.txt",
        "/files/%2e%2e%2fsecret.txt",
        "/files/%2e%2e/secret.txt",
        "/files/..%2fsecret.txt",
        "/files/requests/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/files/%2F" + "%2F".join(["..", "..", "..", "etc", "hostname"]),
        "/files/link.txt",
        "/files/%00",
    ],
)
async def test_files_refuses_to_leave_the_store(client: Client, raw_path: str) -> None:
    # encoded=True sends the path byte for byte: no client-side normalisation of ".." or "%2e".
    url = URL(f"http://127.0.0.1:{client.port}{raw_path}", encoded=True)
    async with client.session.get(url) as response:
        assert SECRET not in await response.read()
        await error_of(response, 404, "not_found")


# -- shutdown -------------------------------------------------------------------------------


async def test_drain_lets_an_upload_in_flight_finish(
    store: Path, fake_ingest: tuple[FakeIngest, str]
) -> None:
    servicer, ingest_addr = fake_ingest
    runner = await start(create_app(settings_for(store, ingest_addr)), "127.0.0.1", 0)
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    drained: asyncio.Task[None] | None = None
    try:
        async with aiohttp.ClientSession() as session:

            async def body() -> AsyncIterator[bytes]:
                nonlocal drained
                yield CSV[:10]
                await servicer.received_header.wait()
                # SIGTERM arrives while the body is still streaming in.
                drained = asyncio.create_task(drain(runner, grace=10))
                await runner.app[IN_FLIGHT].draining.wait()
                with pytest.raises(aiohttp.ClientConnectionError):
                    await session.get(f"{base}/healthz")
                yield CSV[10:]

            response = await session.post(
                f"{base}/upload", data=body(), headers={"Content-Type": "text/csv"}
            )
            assert response.status == 202
            assert response.headers.get("Connection", "").lower() == "close"
            response.release()
        assert servicer.completed == [CSV]
    finally:
        if drained is None:
            await runner.cleanup()
        else:
            await drained
