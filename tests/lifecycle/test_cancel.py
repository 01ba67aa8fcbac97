"""Cancel, end to end: a running request stopped over REST while a slow origin counts every
fetch; its pending images end as CANCELLED, its done images and output CSV stay, and the
request.cancelled webhook is delivered."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from testing.listeners import serve_receiver
from testing.origin import serve_images
from testing.polling import wait_until_async
from testing.stack import Stack
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
