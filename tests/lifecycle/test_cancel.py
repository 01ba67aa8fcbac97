"""Cancel, end to end: a running request stopped over REST while a slow origin counts every
fetch; its pending images end as CANCELLED, its done images and output CSV stay, and the
request.cancelled webhook is delivered."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import io
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from testing.databases import waits_for_a_lock
from testing.listeners import serve_receiver
from testing.origin import serve_images
from testing.polling import wait_until_async
from testing.stack import Stack, live_stack
from tests.e2e.test_pipeline import upload_csv, wait_completed
from tests.e2e.test_webhooks_e2e import HookedStack, hooked_stack, new_secret, received

IMAGES = 400
# No fetch of the request may start this long after the cancel's answer (issue 13).
STOP_WITHIN = 2.0
# How long after that the origin is watched for a fetch that should not come.
WATCH = 3.0


def csv_of(urls: list[str], per_product: int = 4) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for n, start in enumerate(range(0, len(urls), per_product), start=1):
        writer.writerow([str(n), f"Product {n}", ",".join(urls[start : start + per_product])])
    return out.getvalue().encode()


async def status_of(http: aiohttp.ClientSession, base: str, request_id: str) -> dict[str, Any]:
    async with http.get(f"{base}/status/{request_id}?page_size=1000") as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
    return body


async def test_cancel_mid_request_stops_fetching_and_keeps_what_is_done(
    tmp_path: Path, database_url: str, redis_server_url: str, stack_factory: list[Stack]
) -> None:
    secret = new_secret()
    async with (
        serve_images((320, 240), delay=0.4) as origin,
        serve_receiver(secret) as receiver,
    ):
        base = hooked_stack(
            HookedStack(tmp_path, database_url, redis_server_url, origin, stack_factory),
            receiver,
            {
                "IMGPIPE_WEBHOOK_SECRET": secret,
                "IMGPIPE_DEV_WORKERS": "1",
                "IMGPIPE_WORKER_CONCURRENCY": "4",
            },
        )
        urls = [origin.url(f"/img/c{i}.jpg") for i in range(IMAGES)]
        async with aiohttp.ClientSession() as http:
            form = aiohttp.FormData()
            form.add_field("webhook_url", receiver.url("/hooks/cancel"))
            form.add_field("file", csv_of(urls), filename="p.csv", content_type="text/csv")
            async with http.post(f"{base}/upload", data=form) as response:
                assert response.status == 202, await response.text()
                request_id = (await response.json())["request_id"]

            # Running for real: a few images done, most still waiting or on the stream.
            async def some_done() -> bool:
                done: int = (await status_of(http, base, request_id))["progress"]["images_done"]
                return done >= 3

            await wait_until_async(some_done, timeout=60, interval=0.1, message="3 images done")
            async with http.delete(f"{base}/requests/{request_id}") as response:
                assert response.status == 409, await response.text()  # running: not deleted
            async with http.post(f"{base}/requests/{request_id}/cancel") as response:
                answered = time.monotonic()
                assert response.status == 200, await response.text()
                cancelled = await response.json()
            assert cancelled["status"] == "Cancelled"
            assert cancelled["completed_at"] is not None

            # Observation window: fetches are counted, not waited for.
            await asyncio.sleep(STOP_WITHIN + WATCH)
            late = [path for path, at in origin.hits if at > answered + STOP_WITHIN]
            assert late == [], f"{len(late)} fetches started more than 2 s after the cancel"
            assert len(origin.hits) < IMAGES / 2

            final = await status_of(http, base, request_id)
            progress = final["progress"]
            assert final["status"] == "Cancelled"
            assert progress["images_done"] + progress["images_failed"] == IMAGES
            assert progress["images_done"] >= 3
            codes = [e["code"] for p in final["products"] for e in p["errors"]]
            assert codes.count("CANCELLED") == progress["images_failed"]
            outputs = [u for p in final["products"] for u in p["output_image_urls"] if u]
            assert len(outputs) == progress["images_done"]
            async with http.get(outputs[0]) as response:
                assert response.status == 200  # a done image keeps its output

            async with http.get(final["output_csv_url"]) as response:
                assert response.status == 200, await response.text()
                rows = list(csv.reader(io.StringIO(await response.text())))
            assert len(rows) == 1 + IMAGES // 4
            assert "CANCELLED" in "".join(",".join(row) for row in rows)

            # Cancelling again is the same state (also from the page's button, which answers
            # 303 to the status page); cancelling a request done otherwise is 409.
            form_url = f"{base}/ui/requests/{request_id}/cancel"
            async with http.post(form_url, allow_redirects=False) as response:
                assert response.status == 303, await response.text()
                assert response.headers["Location"] == f"/ui/requests/{request_id}"
            async with http.get(f"{base}/ui/requests/{request_id}") as response:
                page = await response.text()
            assert "Cancelled" in page and 'id="cancel"' not in page
            async with http.post(f"{base}/requests/{request_id}/cancel") as response:
                assert response.status == 200
                again = await response.json()
            assert (again["status"], again["progress"]["images_done"]) == (
                "Cancelled",
                progress["images_done"],
            )
            done_id = await _completed_request(http, base, origin.url("/img/other.jpg"))
            async with http.post(f"{base}/requests/{done_id}/cancel") as response:
                assert response.status == 409, await response.text()

            deliveries = await received(receiver, 1)
            cancels = [d for d in deliveries if d.payload["type"] == "request.cancelled"]
            assert [d.payload["data"]["request_id"] for d in cancels] == [request_id]
            assert cancels[0].payload["data"]["status"] == "Cancelled"
            assert receiver.rejected == []


async def _completed_request(http: aiohttp.ClientSession, base: str, url: str) -> str:
    response = await upload_csv(http, base, csv_of([url]))
    assert response.status == 202, await response.text()
    request_id: str = (await response.json())["request_id"]
    assert (await wait_completed(http, base, request_id))["status"] == "Completed"
    return request_id


pytestmark = pytest.mark.timeout(240)


@contextlib.asynccontextmanager
async def holding_the_request_row(database_url: str, request_id: str) -> AsyncIterator[None]:
    """A transaction that holds the request's row, as a long statement of another caller
    would, until the block ends."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT 1 FROM requests WHERE id = $1 FOR UPDATE", uuid.UUID(request_id)
            )
            yield
    finally:
        await conn.close()


async def service_waits_for_a_lock(database_url: str, application_name: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return await waits_for_a_lock(conn, application_name=application_name)
    finally:
        await conn.close()


async def test_a_cancel_and_a_retry_may_take_longer_than_a_read(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    stack_factory: list[Stack],
) -> None:
    """A cancel or a retry of a large request is one statement over every image (5 and 6 s at
    300,000 images, bench/results/longest-statements.md): the gateway gave it the deadline of a
    read (IMGPIPE_RPC_TIMEOUT) and answered 504 while the statement was cut short. Here a
    transaction holds the request's row for twice that deadline while each call waits."""
    rpc_timeout = 1.0
    async with serve_images((320, 240)) as origin:
        paths = [f"/img/long{i}.jpg" for i in range(4)]
        origin.gates.update({path: asyncio.Event() for path in paths})  # they stay Pending
        base = live_stack(
            tmp_path,
            database_url,
            redis_server_url,
            stack_factory,
            origin.port,
            IMGPIPE_RPC_TIMEOUT=f"{rpc_timeout:g}",
            IMGPIPE_DEV_WORKERS="1",
        ).base_url
        try:
            async with aiohttp.ClientSession() as http:
                uploaded = await upload_csv(http, base, csv_of([origin.url(p) for p in paths]))
                assert uploaded.status == 202, await uploaded.text()
                request_id = (await uploaded.json())["request_id"]
                for path, service, expected in (
                    ("cancel", "imgpipe-status", 200),
                    ("retry", "imgpipe-ingest", 202),  # resumes the cancelled request
                ):
                    async with holding_the_request_row(database_url, request_id):
                        call = asyncio.ensure_future(
                            http.post(f"{base}/requests/{request_id}/{path}")
                        )
                        called = time.monotonic()
                        await wait_until_async(
                            functools.partial(service_waits_for_a_lock, database_url, service),
                            timeout=30,
                            message=f"the {path} to wait for the request's row",
                        )
                        # Held past the deadline of a read: the time passing is the scenario.
                        await asyncio.sleep(max(0.0, called + 2 * rpc_timeout - time.monotonic()))
                    async with await call as answer:
                        assert answer.status == expected, await answer.text()
                status = (await status_of(http, base, request_id))["status"]
                assert status in ("Pending", "Processing")
        finally:
            for gate in origin.gates.values():
                gate.set()
