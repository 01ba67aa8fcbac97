"""An upload that ingest refuses reaches the HTTP caller as ingest's answer, never as a 500,
however much of the file the gateway still had to send: against real ingest (its API-key
interceptor, Postgres, Redis) behind the gateway, in this process on 127.0.0.1.

An asyncio gRPC client whose write is in flight when the server ends the call reports INTERNAL
instead of the server's status (grpc/grpc#36066). Before the fix, 5 of 15 uploads of a 9 MB file
with bad rows answered 500. Now ingest refuses what needs no file before it asks for the file
(services/common/initial_metadata.py), and reads a refused file to its end before it answers.
"""

from __future__ import annotations

import asyncio
import io
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import GatewaySettings
from imgpipe.client import ApiClient
from imgpipe.errors import ApiError
from services.common.auth import Limits, key_hash, new_key, parse_api_keys
from services.common.csv_format import CsvLimits
from services.common.db.pool import migrate
from services.common.grpc_auth import ApiKeyInterceptor
from services.common.initial_metadata import is_ready
from services.common.limits import Limiter
from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.storage import StorageConfig
from services.common.streams import StreamNames
from services.ingest.servicer import IngestServicer
from services.ingest.servicer import registrar as ingest_registrar
from testing.gateway import GatewayServer
from testing.polling import wait_until_async
from testing.uploads import csv_of

pytestmark = pytest.mark.integration

Client = TestClient[web.Request, web.Application]

OPEN, SLOW, SINGLE = new_key(), new_key(), new_key()
TRIES = 12  # each try lost the race about one time in three before the fix
URL = "http://127.0.0.1:9/"


@dataclass
class Stack:
    http: Client
    ingest: ingest_grpc.IngestServiceAsyncStub  # direct, past the gateway
    pool: asyncpg.Pool
    tag: str  # the suffix of this test's key names


@pytest.fixture
async def stack(
    db_pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, redis_prefix: str, tmp_path: Path
) -> AsyncIterator[Stack]:
    """The gateway in front of ingest with three keys: `open` (a generous rate), `slow` (one
    call a minute) and `single` (one upload at a time)."""
    await migrate(db_pool)
    names = StreamNames(f"{redis_prefix}:{secrets.token_hex(4)}")
    tag = f"-{secrets.token_hex(3)}"
    keys, problems = parse_api_keys(
        f"open{tag}:{key_hash(OPEN)} rate=100/s burst=1000,"
        f" slow{tag}:{key_hash(SLOW)} rate=1/min burst=1,"
        f" single{tag}:{key_hash(SINGLE)} rate=0 uploads=1",
        Limits(),
    )
    assert problems == []
    limiter = Limiter(redis_client, names, db_pool)
    server = grpc.aio.server(interceptors=[ApiKeyInterceptor(keys, limiter.check_rate)])
    ingest_registrar(IngestServicer(db_pool, redis_client, names, CsvLimits(), limiter))(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    settings = GatewaySettings(
        ingest_addr=f"127.0.0.1:{port}",
        status_addr=f"127.0.0.1:{port}",
        storage=StorageConfig((tmp_path / "store").as_uri()),
        rpc_timeout=10,
        api_keys=keys,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        async with TestClient(GatewayServer(create_app(settings), host="127.0.0.1")) as http:
            yield Stack(http, ingest_grpc.IngestServiceStub(channel), db_pool, tag)
    finally:
        await channel.close(None)
        await server.stop(None)


def big_csv(bad_rows: int) -> bytes:
    """About 9 MB: `bad_rows` rows without a product name first, then good rows."""
    bad = [(str(i + 1), "", [f"{URL}bad.jpg"]) for i in range(bad_rows)]
    good = [(str(i + 1_000), f"P{i}", [f"{URL}{'x' * 200}.jpg"]) for i in range(40_000)]
    return csv_of(bad + good)


async def post(stack: Stack, key: str, body: bytes) -> tuple[int, dict[str, Any], Any]:
    response = await stack.http.post(
        "/upload",
        data=io.BytesIO(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "text/csv"},
    )
    return response.status, dict(response.headers), await response.json()


async def requests_of(stack: Stack, owner: str) -> int:
    count: int = await stack.pool.fetchval(
        "SELECT count(*) FROM requests WHERE owner = $1", f"{owner}{stack.tag}"
    )
    return count


async def test_a_file_refused_for_its_rows_is_a_400_naming_them(stack: Stack) -> None:
    body = big_csv(bad_rows=150)  # past max_problems: ingest used to stop reading here
    answers = [await post(stack, OPEN, body) for _ in range(TRIES)]
    assert [status for status, _, _ in answers] == [400] * TRIES
    details = answers[-1][2]["error"]["details"]
    assert len(details) == CsvLimits().max_problems
    assert details[0] == {"row": 2, "column": "Product Name", "message": details[0]["message"]}
    assert await requests_of(stack, "open") == 0


async def test_an_upload_over_the_rate_is_a_429_with_the_quota(stack: Stack) -> None:
    status, headers, _ = await post(stack, SLOW, csv_of([("1", "Lamp", [f"{URL}a.jpg"])]))
    assert status == 202
    # The quota an upload used to send first now comes with ingest's go-ahead.
    assert (headers["RateLimit-Limit"], headers["RateLimit-Remaining"]) == ("1", "0")

    body = big_csv(bad_rows=0)
    for _ in range(TRIES):
        status, headers, answer = await post(stack, SLOW, body)
        assert (status, answer["error"]["code"]) == (429, "rate_limited")
        assert int(headers["Retry-After"]) >= 1
        assert headers["RateLimit-Remaining"] == "0"
    assert await requests_of(stack, "slow") == 1


async def test_an_upload_over_the_uploads_limit_is_a_429(stack: Stack) -> None:
    # One upload held open past the gateway: ingest has said it is ready, so it holds the lease.
    held = stack.ingest.UploadCsv(
        None, timeout=30, metadata=(("authorization", f"Bearer {SINGLE}"),)
    )
    await held.write(ingest_pb.UploadCsvRequest(header=ingest_pb.UploadHeader()))
    assert is_ready(await asyncio.wait_for(held.initial_metadata(), timeout=10))
    try:
        body = big_csv(bad_rows=0)
        for _ in range(TRIES):
            status, _, answer = await post(stack, SINGLE, body)
            assert (status, answer["error"]["code"]) == (429, "rate_limited")
            assert "uploads" in answer["error"]["message"]
    finally:
        held.cancel()
    # The lease comes back when ingest sees the cancel: the same key uploads again.
    small = csv_of([("1", "Lamp", [f"{URL}a.jpg"])])

    async def accepted() -> bool:
        status, _, _ = await post(stack, SINGLE, small)
        return status == 202

    await wait_until_async(accepted, message="an upload after the held one was cancelled")


# Expect: 100-continue (gateway/expect_continue.py): a refusal that needs no file comes before
# the client sends any of it, on a connection the gateway then closes.


@dataclass
class Waiting:
    """A connection that sent POST /upload's head with `Expect: 100-continue` and no body."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def answer(self) -> tuple[int, dict[str, str]]:
        """The next status line's code and its header fields (lower-case names)."""
        status = await asyncio.wait_for(self.reader.readline(), 10)
        fields = {}
        while (line := await asyncio.wait_for(self.reader.readline(), 10)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            fields[name.strip().lower()] = value.strip()
        return int(status.split()[1]), fields

    async def rest(self) -> bytes:
        """Everything the server sends until it closes the connection (within 10 s)."""
        received = b""
        while data := await asyncio.wait_for(self.reader.read(65536), 10):
            received += data
        return received


async def expecting(
    stack: Stack, key: str, size: int, query: str = "", content_type: str = "text/csv"
) -> Waiting:
    port = stack.http.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /upload{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {size}\r\nExpect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    return Waiting(reader, writer)


@pytest.mark.parametrize(
    ("key", "query", "size", "status"),
    [
        (new_key(), "", 1000, 401),  # a key the gateway does not know
        (OPEN, "?quality=500", 1000, 400),  # an option out of range
        (OPEN, "", 100 * 1024 * 1024, 413),  # a declared size over IMGPIPE_MAX_UPLOAD_BYTES
        (SINGLE, "", 1000, 429),  # over uploads=1 (the held upload below): ingest's refusal
    ],
    ids=["unknown key", "bad option", "too large", "uploads limit"],
)
async def test_a_refusal_comes_before_the_100_and_closes_the_connection(
    stack: Stack, key: str, query: str, size: int, status: int
) -> None:
    held = stack.ingest.UploadCsv(
        None, timeout=30, metadata=(("authorization", f"Bearer {SINGLE}"),)
    )
    await held.write(ingest_pb.UploadCsvRequest(header=ingest_pb.UploadHeader()))
    assert is_ready(await asyncio.wait_for(held.initial_metadata(), timeout=10))
    waiting = await expecting(stack, key, size, query)
    try:
        answer, fields = await waiting.answer()
        assert answer == status  # not 100: the client has not sent a byte, and need not
        assert fields["connection"] == "close"
    finally:
        waiting.writer.close()
        held.cancel()


async def test_a_body_sent_after_the_refusal_anyway_is_skipped_and_the_connection_ends(
    stack: Stack,
) -> None:
    # A client may send the body without waiting (RFC 9110, 10.1.1). What follows it is not
    # taken for a next request: the connection ends after the body.
    body = csv_of([("1", "Lamp", [f"{URL}a.jpg"])])
    waiting = await expecting(stack, new_key(), len(body))
    try:
        assert (await waiting.answer())[0] == 401
        waiting.writer.write(body + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"HTTP/1.1" not in await waiting.rest()  # the error's JSON body only
    finally:
        waiting.writer.close()


BOUNDARY = "imgpipe-test-boundary"


def form_of(csv: bytes) -> bytes:
    """A multipart form: `quality`, then the CSV as its `file` field."""
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="quality"\r\n\r\n70\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n".encode()
        + csv
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


@pytest.mark.parametrize("form", [False, True], ids=["text/csv", "multipart form"])
async def test_an_accepted_upload_gets_its_100_then_sends_the_file(
    stack: Stack, form: bool
) -> None:
    # A form's options are in its body, so its 100 comes before they are read.
    csv = csv_of([("1", "Lamp", [f"{URL}a.jpg"])])
    body = form_of(csv) if form else csv
    content_type = f"multipart/form-data; boundary={BOUNDARY}" if form else "text/csv"
    waiting = await expecting(stack, OPEN, len(body), content_type=content_type)
    try:
        assert await waiting.answer() == (100, {})
        waiting.writer.write(body)
        status, _ = await waiting.answer()
        assert status == 202
    finally:
        waiting.writer.close()
    assert await requests_of(stack, "open") == 1


class Tripwire(io.BytesIO):
    """A CSV file that notes whether anything read it."""

    touched = False

    def read(self, size: int | None = -1) -> bytes:
        self.touched = True
        return super().read(size)


async def test_the_client_sends_no_file_that_is_refused(stack: Stack) -> None:
    base_url = str(stack.http.make_url("/"))
    refused = Tripwire(csv_of([("1", "Lamp", [f"{URL}a.jpg"])]))
    async with ApiClient(base_url, api_key=new_key()) as api:
        with pytest.raises(ApiError) as caught:
            await api.upload(refused)
    assert caught.value.status == 401
    assert not refused.touched

    accepted = Tripwire(csv_of([("1", "Lamp", [f"{URL}a.jpg"])]))
    async with ApiClient(base_url, api_key=OPEN) as api:
        answer, created = await api.upload(accepted)
    assert created and answer["images"] == 1
    assert accepted.touched
