"""Issue 14, findings 1, 3 and the retry of finding 7: what one tenant's uploads can do to the
others, on the real stack (`python -m services.local`) with several API keys.

Images point at `http://127.0.0.1:9/...`, which the fetch guard refuses without connecting, so
requests become final (Failed) at once and nothing leaves the machine. A "stalled" upload is a
raw connection that sends its headers and the start of its body, then nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from yarl import URL

from services.common.auth import key_hash, new_key
from testing.polling import wait_until_async
from testing.stack import Stack, start_stack

pytestmark = pytest.mark.e2e

# HOSTILE may have many uploads at once, so that the test shows what they cost the others;
# TENANT is a second tenant with the defaults; CAPPED has the default `uploads=2`; DAILY may
# have 3 images a day.
HOSTILE, TENANT, CAPPED, DAILY = new_key(), new_key(), new_key(), new_key()
LIMIT = 64 * 1024
STALLED = 16
REFUSED = "http://127.0.0.1:9"
CSV = f"S. No.,Product Name,Input Image Urls\n1,Shoe,{REFUSED}/a.jpg\n".encode()
# Generous: an answer comes in well under a second; without the fix none comes at all.
ANSWER_DEADLINE = 30.0


@dataclass(frozen=True)
class Live:
    stack: Stack
    redis_url: str
    prefix: str

    @property
    def base(self) -> str:
        return self.stack.base_url

    async def uploads_held(self, owner: str) -> int:
        """The upload leases `owner` holds in ingest's limiter (services/common/limits.py)."""
        client = redis.asyncio.Redis.from_url(self.redis_url)
        try:
            return int(await client.zcard(f"{self.prefix}:limits:uploads:{owner}"))
        finally:
            await client.aclose()


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_server_url: str
) -> Iterator[Live]:
    prefix = f"imgpipe-security-{new_key()[-8:].lower()}"
    stack = start_stack(
        tmp_path_factory.mktemp("uploads"),
        {
            "IMGPIPE_DATABASE_URL": database_url,
            "IMGPIPE_REDIS_URL": redis_server_url,
            "IMGPIPE_REDIS_PREFIX": prefix,
            "IMGPIPE_DEV_WORKERS": "1",
            "IMGPIPE_API_KEYS": (
                f"hostile:{key_hash(HOSTILE)} rate=0 concurrent=100 uploads={STALLED + 4},"
                f"tenant:{key_hash(TENANT)} rate=0,"
                f"capped:{key_hash(CAPPED)} rate=0,"
                f"daily:{key_hash(DAILY)} rate=0 images_per_day=3"
            ),
            "IMGPIPE_MAX_UPLOAD_BYTES": str(LIMIT),
            # Stalled uploads stay stalled for the whole test (the 408 is tested on its own).
            "IMGPIPE_UPLOAD_IDLE_TIMEOUT": "600",
        },
    )
    try:
        yield Live(stack, redis_server_url, prefix)
    finally:
        stack.stop_and_reap()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Stalled:
    """Uploads that sent their headers and the start of a body, then stopped."""

    writers: list[asyncio.StreamWriter]

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        for writer in self.writers:
            with contextlib.suppress(OSError):  # the gateway may have closed it first
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def stalled_uploads(live: Live, key: str, count: int) -> AsyncIterator[Stalled]:
    url = URL(live.base)
    stalled = Stalled([])
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(url.host, url.port)
            del reader  # nothing will be read: the upload never ends
            head = (
                f"POST /upload HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: text/csv\r\n"
                f"Content-Length: {LIMIT}\r\n\r\n"
            )
            writer.write(head.encode() + CSV)
            await writer.drain()
            stalled.writers.append(writer)
        yield stalled
    finally:
        await stalled.close()


async def answer(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, Any]:
    async with asyncio.timeout(ANSWER_DEADLINE), http.request(method, url, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, response.headers


async def upload(http: aiohttp.ClientSession, live: Live, key: str, **kwargs: Any) -> Any:
    headers = {**bearer(key), "Content-Type": "text/csv", **kwargs.pop("headers", {})}
    return await answer(
        http, "POST", f"{live.base}/upload", headers=headers, data=kwargs.pop("data", CSV)
    )


# ------------------------------------------------------------------------- finding 1


async def test_finding_1_stalled_uploads_leave_other_keys_answered_and_ready(
    live: Live, http: aiohttp.ClientSession
) -> None:
    async with stalled_uploads(live, HOSTILE, STALLED):
        await wait_until_async(
            lambda: _held(live, "hostile", STALLED),
            timeout=60,
            message=f"{STALLED} stalled uploads received by ingest",
        )
        status, body, _ = await upload(http, live, TENANT)
        assert status == 202, body
        for _ in range(3):
            status, body, _ = await answer(http, "GET", f"{live.base}/readyz")
            assert status == 200, body


async def _held(live: Live, owner: str, count: int) -> bool:
    return await live.uploads_held(owner) == count


async def test_finding_1_uploads_in_progress_are_capped_per_key(
    live: Live, http: aiohttp.ClientSession
) -> None:
    async with stalled_uploads(live, CAPPED, 2) as stalled:
        await wait_until_async(
            lambda: _held(live, "capped", 2), timeout=60, message="2 uploads received"
        )
        status, body, headers = await upload(http, live, CAPPED)
        assert status == 429, body
        assert body["error"]["details"][0]["column"] == "uploads"
        assert int(headers["Retry-After"]) >= 1
        # Another key is not affected, and the slot comes back once an upload ends.
        assert (await upload(http, live, TENANT))[0] == 202
        gone_before = _uploads_gone(live)
        await stalled.close()
        # At once, not when the leases expire (UPLOAD_LEASE, 30 s; the key itself after 60 s).
        await wait_until_async(
            lambda: _held(live, "capped", 0), timeout=10, message="the leases given back"
        )
        assert (await upload(http, live, CAPPED))[0] == 202

    # A client that goes away is its own doing: a 499, and no traceback in the gateway's log.
    async def both_logged() -> bool:
        return _uploads_gone(live) >= gone_before + 2

    await wait_until_async(both_logged, timeout=10, message="the two uploads logged as 499")
    assert '"unhandled error"' not in live.stack.log.read_text(errors="replace")


def _uploads_gone(live: Live) -> int:
    """Uploads the gateway's access log shows as closed by their client (499)."""
    lines = live.stack.log.read_text(errors="replace").splitlines()
    # Whole JSON lines only: the last one may be half written.
    logged = [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}")]
    return sum(1 for e in logged if e.get("target") == "/upload" and e.get("status") == 499)


# ------------------------------------------------------------------------- finding 3

BOUNDARY = "imgpipe-security"


def form_part(name: str, value: bytes, filename: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


def chunked(body: bytes) -> Any:
    """The body as a generator: sent chunked, with no Content-Length to check up front."""

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 16 * 1024):
            yield body[start : start + 16 * 1024]

    return chunks()


FILE_PART = form_part("file", CSV, "products.csv")
FORM_END = f"--{BOUNDARY}--\r\n".encode()
FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        # Bytes before the first boundary: skipped by the form parser, counted now.
        (b"x" * (2 * LIMIT) + b"\r\n" + FILE_PART + FORM_END, FORM, {413}),
        # An ignored form part over the limit (the review's 60 MiB part against 50 MiB).
        (form_part("notes", b"n" * (2 * LIMIT)) + FILE_PART + FORM_END, FORM, {400, 413}),
        # ... and after the file.
        (FILE_PART + form_part("notes", b"n" * (2 * LIMIT)) + FORM_END, FORM, {400, 413}),
        # A compressed body: never inflated.
        (gzip.compress(CSV), {"Content-Type": "text/csv", "Content-Encoding": "gzip"}, {415}),
    ],
    ids=["preamble", "unknown-part", "unknown-part-after-file", "gzip"],
)
async def test_finding_3_every_byte_of_the_body_counts(
    live: Live,
    http: aiohttp.ClientSession,
    body: bytes,
    headers: dict[str, str],
    expected: set[int],
) -> None:
    status, answered, _ = await upload(http, live, TENANT, data=chunked(body), headers=headers)
    assert status in expected, answered
    if status == 413:
        assert f"IMGPIPE_MAX_UPLOAD_BYTES={LIMIT}" in answered["error"]["message"]


# ------------------------------------------------------------------------- finding 7


async def test_finding_7_a_retry_is_charged_images_per_day(
    live: Live, http: aiohttp.ClientSession
) -> None:
    two_images = f'S. No.,Product Name,Input Image Urls\n1,Shoe,"{REFUSED}/a.jpg,{REFUSED}/b.jpg"\n'
    status, body, _ = await upload(http, live, DAILY, data=two_images.encode())
    assert status == 202, body
    request_id = body["request_id"]

    async def failed() -> bool:
        _, found, _ = await answer(
            http, "GET", f"{live.base}/status/{request_id}", headers=bearer(DAILY)
        )
        return bool(found["status"] == "Failed")

    await wait_until_async(failed, timeout=60, interval=0.2, message="the request Failed")
    # 2 images today; a retry fetches both again: 4 > 3.
    status, body, headers = await answer(
        http, "POST", f"{live.base}/requests/{request_id}/retry", headers=bearer(DAILY)
    )
    assert status == 429, body
    assert body["error"]["details"][0]["column"] == "images_per_day"
    assert int(headers["Retry-After"]) >= 1
    # Refused whole: the images stay Failed, nothing was queued again.
    _, found, _ = await answer(
        http, "GET", f"{live.base}/status/{request_id}", headers=bearer(DAILY)
    )
    assert found["status"] == "Failed"
