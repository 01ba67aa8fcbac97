"""Images in flight at a cancel, end to end: the origin holds one image's answer until the test
releases it, the request is cancelled meanwhile, and the late result is recorded (docs/
lifecycle.md): a success turns the image and its repeats Done in a request that stays
Cancelled, with its output listed in the output CSV; a failure leaves it CANCELLED."""

from __future__ import annotations

import asyncio
import csv
import io
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from services.common.db.lifecycle import CANCELLED_MESSAGE
from services.common.streams import WORKER_GROUP, StreamNames
from testing.origin import ImageOrigin, serve_images
from testing.polling import wait_until_async
from testing.stack import Stack, start_stack
from tests.lifecycle.test_cancel import csv_of, status_of

pytestmark = pytest.mark.timeout(240)


@dataclass(frozen=True)
class OneAtATime:
    """Starts a stack with one worker taking one task at a time (while the held image is in
    flight, no other of the request starts), on a Redis prefix the test knows."""

    tmp_path: Path
    env: dict[str, str]
    names: StreamNames
    stacks: list[Stack]

    def start(self, origin: ImageOrigin) -> str:
        allowed = {"IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}"}
        stack = start_stack(self.tmp_path, self.env | allowed)
        self.stacks.append(stack)
        return stack.base_url


@pytest.fixture
def one_at_a_time(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    stack_factory: list[Stack],
) -> OneAtATime:
    names = StreamNames(f"{redis_prefix}:{secrets.token_hex(4)}")
    env = {
        "IMGPIPE_DATABASE_URL": database_url,
        "IMGPIPE_REDIS_URL": redis_server_url,
        "IMGPIPE_REDIS_PREFIX": names.prefix,
        "IMGPIPE_DEV_WORKERS": "1",
        "IMGPIPE_WORKER_CONCURRENCY": "1",
    }
    return OneAtATime(tmp_path, env, names, stack_factory)


async def _upload_and_cancel_in_flight(
    http: aiohttp.ClientSession, base: str, origin: ImageOrigin, urls: list[str], held: str
) -> tuple[str, dict[str, Any]]:
    """Upload `urls` (two a product), wait until the origin holds `held`, cancel; the request
    id and the cancel's answer."""
    form = aiohttp.FormData()
    form.add_field("file", csv_of(urls, per_product=2), filename="p.csv", content_type="text/csv")
    async with http.post(f"{base}/upload", data=form) as response:
        assert response.status == 202, await response.text()
        request_id: str = (await response.json())["request_id"]

    async def in_flight() -> bool:
        return origin.hits_of(held) > 0

    await wait_until_async(in_flight, timeout=60, interval=0.05, message="the held image fetched")
    async with http.post(f"{base}/requests/{request_id}/cancel") as response:
        assert response.status == 200, await response.text()
        cancelled: dict[str, Any] = await response.json()
    assert cancelled["status"] == "Cancelled"
    # At the cancel every image not final is CANCELLED, the one in flight included.
    assert (cancelled["progress"]["images_done"], cancelled["progress"]["images_failed"]) == (
        0,
        len(urls),
    )
    return request_id, cancelled


def _errors(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {e["url"]: (e["code"], e["message"]) for p in status["products"] for e in p["errors"]}


async def _output_csv(http: aiohttp.ClientSession, url: str) -> list[list[str]]:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return list(csv.reader(io.StringIO(await response.text())))


async def test_a_result_in_flight_at_the_cancel_is_recorded_done(
    one_at_a_time: OneAtATime,
) -> None:
    async with serve_images((320, 240)) as origin, aiohttp.ClientSession() as http:
        held, other, third = (origin.url(f"/img/f{i}.jpg") for i in range(3))
        origin.gates["/img/f0.jpg"] = release = asyncio.Event()
        base = one_at_a_time.start(origin)
        # The held URL twice: its second image is a follower that takes its outcome.
        urls = [held, other, held, third]
        request_id, _ = await _upload_and_cancel_in_flight(http, base, origin, urls, held)
        release.set()

        async def recorded() -> dict[str, Any] | None:
            status = await status_of(http, base, request_id)
            return status if status["progress"]["images_done"] else None

        final = await wait_until_async(recorded, timeout=60, interval=0.1, message="late result")
        progress = final["progress"]
        assert final["status"] == "Cancelled"  # a late result does not reopen the request
        assert (progress["images_done"], progress["images_failed"]) == (2, 2)
        [first, second] = final["products"]
        output = first["output_image_urls"][0]
        assert output is not None and second["output_image_urls"][0] == output
        assert first["output_image_urls"][1] is None and second["output_image_urls"][1] is None
        assert _errors(final) == {other: ("CANCELLED", CANCELLED_MESSAGE)} | {
            third: ("CANCELLED", CANCELLED_MESSAGE)
        }
        # The counters hold the leader's and its follower's bytes and SSIM, as for any result.
        size = len(origin.source(held))
        assert first["input_bytes"][0] == second["input_bytes"][0] == size
        assert progress["bytes_in"] == 2 * size
        assert progress["bytes_out"] == 2 * first["output_bytes"][0] > 0
        assert progress["mean_ssim"] == first["ssim"][0]
        async with http.get(output) as response:
            assert response.status == 200
            assert len(await response.read()) == first["output_bytes"][0]
        assert origin.hits_of(other) == origin.hits_of(third) == 0

        # The CSV written at the cancel is written again after the late result, listing it.
        async def listed() -> list[list[str]] | None:
            rows = await _output_csv(http, final["output_csv_url"])
            return rows if output in rows[1][3] else None

        rows = await wait_until_async(listed, timeout=30, interval=0.1, message="CSV lists it")
        assert len(rows) == 3
        assert output in rows[2][3]
        assert rows[1][4] == f"{other}: CANCELLED" and rows[2][4] == f"{third}: CANCELLED"


async def test_a_failure_in_flight_at_the_cancel_leaves_the_image_cancelled(
    one_at_a_time: OneAtATime, redis_server_url: str
) -> None:
    names = one_at_a_time.names
    async with (
        serve_images((320, 240)) as origin,
        aiohttp.ClientSession() as http,
        redis.asyncio.Redis.from_url(redis_server_url) as client,
    ):
        held, other = origin.url("/img/x0.jpg"), origin.url("/img/x1.jpg")
        origin.gates["/img/x0.jpg"] = release = asyncio.Event()
        origin.missing.add("/img/x0.jpg")  # answered 404 once released
        base = one_at_a_time.start(origin)
        request_id, cancelled = await _upload_and_cancel_in_flight(
            http, base, origin, [held, other], held
        )
        csv_at_cancel = await _output_csv(http, cancelled["output_csv_url"])
        release.set()

        # The worker is done with the held task once the group has every entry delivered and
        # acknowledged (it acknowledges after recording the outcome).
        async def settled() -> bool:
            [group] = await client.xinfo_groups(names.tasks)
            newest: Any = await client.xrevrange(names.tasks, count=1)
            [[last_id, _]] = newest
            assert group["name"].decode() == WORKER_GROUP
            return bool(group["pending"] == 0 and group["last-delivered-id"] == last_id)

        await wait_until_async(settled, timeout=60, interval=0.1, message="the held task done")
        final = await status_of(http, base, request_id)
        assert final["status"] == "Cancelled"
        counted = ("images_done", "images_failed", "bytes_in", "bytes_out")
        assert [final["progress"][k] for k in counted] == [0, 2, 0, 0]
        # Still the cancel's code and message, not the origin's 404.
        assert _errors(final) == {
            held: ("CANCELLED", CANCELLED_MESSAGE),
            other: ("CANCELLED", CANCELLED_MESSAGE),
        }
        assert await _output_csv(http, final["output_csv_url"]) == csv_at_cancel
