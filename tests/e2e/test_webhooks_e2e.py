"""End to end: a CSV uploaded over REST with a webhook_url, delivered by the status service as
a real process to a receiver on 127.0.0.1 that verifies it with `standardwebhooks`; then the
deliveries listed and redelivered over REST."""

from __future__ import annotations

import base64
import csv
import io
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.test_pipeline import wait_completed
from tests.listeners import Received, Receiver, serve_receiver
from tests.origin import ImageOrigin
from tests.stack import Stack, start_stack
from tests.support import free_tcp_port, wait_until_async

pytestmark = pytest.mark.e2e


async def received(receiver: Receiver, count: int) -> list[Received]:
    async def enough() -> list[Received] | None:
        return receiver.received if len(receiver.received) >= count else None

    return await wait_until_async(enough, timeout=60, interval=0.1, message=f"{count} webhooks")


async def test_upload_with_a_webhook_is_delivered_listed_and_redelivered(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    image_origin: ImageOrigin,
    stack_factory: list[Stack],
) -> None:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    async with serve_receiver(secret) as receiver:
        port = free_tcp_port()
        base = f"http://127.0.0.1:{port}"
        stack = start_stack(
            tmp_path,
            {
                "IMGPIPE_DATABASE_URL": database_url,
                "IMGPIPE_REDIS_URL": redis_server_url,
                "IMGPIPE_HTTP_LISTEN": f"127.0.0.1:{port}",
                "IMGPIPE_PUBLIC_API_URL": base,
                "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{image_origin.port},127.0.0.1:{receiver.port}",
                "IMGPIPE_WEBHOOK_SECRET": secret,
                "IMGPIPE_WEBHOOK_SCHEDULE": "0.2,0.2,0.2",
            },
        )
        stack_factory.append(stack)
        out = io.StringIO()
        csv.writer(out).writerows(
            [
                ["S. No.", "Product Name", "Input Image Urls"],
                ["1", "Shoe", f"{image_origin.url('/img/a.jpg')},{image_origin.url('/img/b.jpg')}"],
            ]
        )
        hook = receiver.url("/hooks/imgpipe")

        async with aiohttp.ClientSession() as http:
            form = aiohttp.FormData()
            form.add_field("webhook_url", hook)  # before the file, as the gateway streams
            form.add_field(
                "file", out.getvalue().encode(), filename="p.csv", content_type="text/csv"
            )
            async with http.post(f"{base}/upload", data=form) as response:
                assert response.status == 202, await response.text()
                request_id = (await response.json())["request_id"]
            status = await wait_completed(http, base, request_id)

            [first] = await received(receiver, 1)
            assert receiver.rejected == []
            assert first.payload["type"] == "request.completed"
            progress = status["progress"]
            assert first.payload["data"] == {
                "request_id": request_id,
                "status": status["status"],
                "images_total": progress["images_total"],
                "images_done": progress["images_done"],
                "images_failed": progress["images_failed"],
                "output_csv_url": status["output_csv_url"],
                "status_url": f"{base}/status/{request_id}",
            }
            async with http.get(first.payload["data"]["status_url"]) as response:
                assert response.status == 200
            event_id = first.headers["webhook-id"]

            listed = await _deliveries(http, base, request_id, ["succeeded"])
            assert listed[0]["event_id"] == event_id
            assert listed[0]["event_type"] == "request.completed"
            assert (listed[0]["url"], listed[0]["attempt"]) == (hook, 1)
            assert (listed[0]["status_code"], listed[0]["error"]) == (200, None)

            async with http.post(f"{base}/requests/{request_id}/webhooks/redeliver") as response:
                assert response.status == 202, await response.text()
                again = (await response.json())["delivery"]
            assert (again["event_id"], again["attempt"], again["state"]) == (
                event_id,
                2,
                "scheduled",
            )

            _, second = await received(receiver, 2)
            assert second.headers["webhook-id"] == event_id
            assert second.body == first.body
            assert receiver.rejected == []
            await _deliveries(http, base, request_id, ["succeeded", "succeeded"])


async def _deliveries(
    http: aiohttp.ClientSession, base: str, request_id: str, states: list[str]
) -> list[dict[str, Any]]:
    async def reached() -> list[dict[str, Any]] | None:
        async with http.get(f"{base}/requests/{request_id}/webhooks") as response:
            assert response.status == 200, await response.text()
            deliveries: list[dict[str, Any]] = (await response.json())["deliveries"]
        return deliveries if [d["state"] for d in deliveries] == states else None

    return await wait_until_async(reached, timeout=30, interval=0.1, message=f"states {states}")
