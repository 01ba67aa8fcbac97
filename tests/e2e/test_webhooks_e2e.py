"""End to end: a CSV uploaded over REST with a webhook_url, delivered by the status service as
a real process to a receiver on 127.0.0.1 that verifies it with `standardwebhooks`; then the
deliveries listed and redelivered over REST."""

from __future__ import annotations

import base64
import csv
import io
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from services.common.auth import key_hash, new_key
from testing.listeners import Received, Receiver, serve_receiver
from testing.origin import ImageOrigin
from testing.polling import wait_until_async
from testing.stack import Stack, live_stack, public_address, run_cli
from tests.e2e.test_pipeline import wait_completed

pytestmark = pytest.mark.e2e


async def received(receiver: Receiver, count: int) -> list[Received]:
    async def enough() -> list[Received] | None:
        return receiver.received if len(receiver.received) >= count else None

    return await wait_until_async(enough, timeout=60, interval=0.1, message=f"{count} webhooks")


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass
class HookedStack:
    """What a stack that sends webhooks is started with."""

    tmp_path: Path
    database_url: str
    redis_server_url: str
    origin: ImageOrigin
    stacks: list[Stack]


def hooked_stack(where: HookedStack, receiver: Receiver, env: dict[str, str]) -> str:
    """Start a stack allowed to reach the image origin and `receiver`; its base URL."""
    stack = live_stack(
        where.tmp_path,
        where.database_url,
        where.redis_server_url,
        where.stacks,
        where.origin.port,
        receiver.port,
        **public_address(),
        **({"IMGPIPE_WEBHOOK_SCHEDULE": "0.2,0.2,0.2"} | env),
    )
    return stack.base_url


def hooked_form(hook: str, origin: ImageOrigin, *paths: str) -> aiohttp.FormData:
    """An upload of one product with the images at `paths` of the origin, and `hook`."""
    out = io.StringIO()
    csv.writer(out).writerows(
        [
            ["S. No.", "Product Name", "Input Image Urls"],
            ["1", "Shoe", ",".join(origin.url(path) for path in paths)],
        ]
    )
    form = aiohttp.FormData()
    form.add_field("webhook_url", hook)  # before the file, as the gateway streams
    form.add_field("file", out.getvalue().encode(), filename="p.csv", content_type="text/csv")
    return form


async def test_upload_with_a_webhook_is_delivered_listed_and_redelivered(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    image_origin: ImageOrigin,
    stack_factory: list[Stack],
) -> None:
    secret = new_secret()
    async with serve_receiver(secret) as receiver:
        base = hooked_stack(
            HookedStack(tmp_path, database_url, redis_server_url, image_origin, stack_factory),
            receiver,
            {"IMGPIPE_WEBHOOK_SECRET": secret},
        )
        hook = receiver.url("/hooks/imgpipe")

        async with aiohttp.ClientSession() as http:
            form = hooked_form(hook, image_origin, "/img/a.jpg", "/img/b.jpg")
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


async def test_with_keys_each_owner_verifies_with_its_own_secret_rotated_from_the_cli(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    image_origin: ImageOrigin,
    stack_factory: list[Stack],
) -> None:
    acme, globex = new_key(), new_key()
    master = new_secret()
    # The receiver's secret is acme's, known once the stack answers.
    async with serve_receiver(master) as receiver:
        base = hooked_stack(
            HookedStack(tmp_path, database_url, redis_server_url, image_origin, stack_factory),
            receiver,
            {
                "IMGPIPE_API_KEYS": f"acme:{key_hash(acme)}, globex:{key_hash(globex)}",
                "IMGPIPE_WEBHOOK_SECRET": master,
            },
        )
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/webhook-secret") as response:
                assert response.status == 401
            first = await _secret(http, base, acme)
            assert (first["owner"], first["generation"], first["previous"]) == ("acme", 1, None)
            assert (await _secret(http, base, globex))["secret"] not in (first["secret"], master)

            code, out = await run_cli(base, "--json", "webhook-secret", "--rotate", key=acme)
            assert code == 0, out
            rotated = json.loads(out)
            assert rotated["generation"] == 2
            assert rotated["previous"]["secret"] == first["secret"]
            receiver.secret = rotated["secret"]

            form = hooked_form(receiver.url("/hooks/acme"), image_origin, "/img/a.jpg")
            headers = {"Authorization": f"Bearer {acme}"}
            async with http.post(f"{base}/upload", data=form, headers=headers) as response:
                assert response.status == 202, await response.text()
                assert response.headers["Location"].startswith(f"{base}/status/")

            [delivery] = await received(receiver, 1)
    assert receiver.rejected == []
    assert delivery.payload["data"]["owner"] == "acme"
    assert len(delivery.headers["webhook-signature"].split(" ")) == 2  # in the grace period
    Webhook(first["secret"]).verify(delivery.body, delivery.headers)  # the old one signs too
    with pytest.raises(WebhookVerificationError):
        Webhook(master).verify(delivery.body, delivery.headers)


async def _secret(http: aiohttp.ClientSession, base: str, key: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.get(f"{base}/webhook-secret", headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Cache-Control"] == "no-store"
        body: dict[str, Any] = await response.json()
    return body
