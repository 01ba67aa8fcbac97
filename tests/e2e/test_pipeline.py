"""End to end: the four services as real processes, a CSV over REST, images from 127.0.0.1."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from services.common.storage import S3Options, Storage, StorageConfig
from testing import photos
from testing.origin import ImageOrigin, serve_images_in_thread
from testing.polling import wait_until_async
from testing.stack import ROOT, Stack, StartStack, stack_running, start_stack

pytestmark = pytest.mark.e2e

STATUS_KEYS = {
    "request_id",
    "status",
    "created_at",
    "updated_at",
    "completed_at",
    "progress",
    "output_csv_url",
    "products",
    "next_page_token",
}
PROGRESS_KEYS = {"images_total", "images_done", "images_failed", "percent", "bytes_in", "bytes_out"}
PRODUCT_KEYS = {
    "serial_number",
    "product_name",
    "input_image_urls",
    "output_image_urls",
    "errors",
    "input_bytes",
    "output_bytes",
    "ssim",
    "quality",
    "notes",
}


async def wait_completed(http: aiohttp.ClientSession, base: str, request_id: str) -> dict[str, Any]:
    async def final() -> dict[str, Any] | None:
        async with http.get(f"{base}/status/{request_id}") as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
        return body if body["status"] in ("Completed", "Failed") else None

    return await wait_until_async(final, timeout=90, interval=0.25, message="request final")


@dataclass(frozen=True)
class Shared:
    """The module's stack, for its tests that need no settings of their own (each uses image
    paths of its own): its image origin, and a slow one for the streaming test."""

    stack: Stack
    origin: ImageOrigin
    slow_origin: ImageOrigin


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory,
    database_url: str,
    redis_server_url: str,
    module_origin: ImageOrigin,
) -> Iterator[Shared]:
    with (
        serve_images_in_thread((800, 600), delay=0.15) as slow_origin,
        stack_running(
            tmp_path_factory.mktemp("pipeline"),
            database_url,
            redis_server_url,
            module_origin.port,
            slow_origin.port,
            # Three identical uploads at once from one address (2 by default, no keys).
            IMGPIPE_LIMIT_UPLOADS="3",
        ) as stack,
    ):
        yield Shared(stack, module_origin, slow_origin)


async def upload_csv(http: aiohttp.ClientSession, base: str, body: bytes) -> aiohttp.ClientResponse:
    form = aiohttp.FormData()
    form.add_field("file", body, filename="products.csv", content_type="text/csv")
    return await http.post(f"{base}/upload", data=form)


@pytest.mark.parametrize("storage_env", ["file", "s3"], indirect=True)
async def test_csv_to_compressed_images_status_and_output_csv(
    shared: Shared, start_live_stack: StartStack, storage_env: dict[str, str]
) -> None:
    """Once with the file:// store the gateway serves (the module's stack), once with S3 and
    presigned URLs (a stack of its own)."""
    image_origin = shared.origin
    stack = start_live_stack(image_origin.port, **storage_env) if storage_env else shared.stack
    base = stack.base_url
    store = "s3" if storage_env else "file"
    products = [
        ("10", "Trail Shoe", [image_origin.url(f"/img/{store}-shoe{i}.jpg") for i in range(3)]),
        ("7", "Tote, leather", [image_origin.url(f"/img/{store}-bag{i}.jpg") for i in range(2)]),
        ("3", "Trail Shoe", [image_origin.url(f"/img/{store}-hat.jpg")]),  # names stay apart
        ("4", "Watch", [image_origin.url(f"/img/{store}-watch{i}.jpg") for i in range(4)]),
    ]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    writer.writerows((s, n, ",".join(u)) for s, n, u in products)

    async with aiohttp.ClientSession() as http:
        async with await upload_csv(http, base, out.getvalue().encode()) as response:
            assert response.status == 202, await response.text()
            accepted = await response.json()
        assert accepted["status"] == "Pending"
        assert (accepted["products"], accepted["images"]) == (4, 10)
        assert accepted["status_url"] == f"{base}/status/{accepted['request_id']}"

        status = await wait_completed(http, base, accepted["request_id"])

        assert set(status) == STATUS_KEYS
        assert status["status"] == "Completed"
        assert set(status["progress"]) >= PROGRESS_KEYS - {"bytes_in", "bytes_out"}
        assert status["progress"]["images_total"] == 10
        assert status["progress"]["images_done"] == 10
        assert status["progress"]["images_failed"] == 0
        assert status["progress"]["percent"] == 100
        ssims = [s for p in status["products"] for s in p["ssim"]]
        assert status["progress"]["mean_ssim"] == pytest.approx(sum(ssims) / 10, abs=1e-3)
        assert status["completed_at"] is not None and status["next_page_token"] is None
        assert [p["serial_number"] for p in status["products"]] == ["10", "7", "3", "4"]
        for product, (serial, name, urls) in zip(status["products"], products, strict=True):
            assert set(product) == PRODUCT_KEYS
            assert (product["serial_number"], product["product_name"]) == (serial, name)
            assert product["input_image_urls"] == urls
            assert len(product["output_image_urls"]) == len(urls)
            assert product["errors"] == []
            assert all(0.5 < ssim < 1 for ssim in product["ssim"])
            assert product["quality"] == [50] * len(urls)
            assert product["notes"] == [""] * len(urls)
            slots = zip(
                urls,
                product["output_image_urls"],
                product["input_bytes"],
                product["output_bytes"],
                strict=True,
            )
            for source_url, output_url, bytes_in, bytes_out in slots:
                async with http.get(output_url) as response:
                    assert response.status == 200
                    data = await response.read()
                source = image_origin.source(source_url)
                with Image.open(io.BytesIO(data)) as image:
                    image.verify()
                with Image.open(io.BytesIO(data)) as image:
                    assert image.format == "JPEG"
                    assert image.size == (800, 600)
                assert (bytes_in, bytes_out) == (len(source), len(data))
                assert len(data) < len(source)

        async with http.get(status["output_csv_url"]) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/csv")
            assert "attachment" in response.headers["Content-Disposition"]
            table = list(csv.reader(io.StringIO(await response.text())))
        assert table[0] == [
            "S. No.",
            "Product Name",
            "Input Image Urls",
            "Output Image Urls",
            "Errors",
            "SSIM",
        ]
        assert [row[5] for row in table[1:]] == [
            ",".join(f"{s:.4f}" for s in p["ssim"]) for p in status["products"]
        ]
        assert [row[:3] for row in table[1:]] == [[s, n, ",".join(u)] for s, n, u in products]
        csv_urls = [row[3].split(",") for row in table[1:]]
        status_urls = [p["output_image_urls"] for p in status["products"]]
        if storage_env:
            await check_presigned_outputs(http, storage_env, csv_urls, status_urls)
        else:
            assert csv_urls == status_urls
        assert all(row[4] == "" for row in table[1:])

        async with http.get(
            f"{base}/status", params={"request_id": accepted["request_id"]}
        ) as response:
            assert response.status == 200
            assert (await response.json())["status"] == "Completed"


async def test_a_size_target_is_met_or_noted_in_the_status_and_the_csv(shared: Shared) -> None:
    image_origin, base = shared.origin, shared.stack.base_url
    # Noise saved at quality 20: nothing from quality 30 up is half its size.
    noise = Image.frombytes("RGB", (320, 240), random.Random(9).randbytes(320 * 240 * 3))
    image_origin.served["/img/target-noise.jpg"] = photos.jpeg(noise, 20)
    urls = [image_origin.url("/img/target-photo.jpg"), image_origin.url("/img/target-noise.jpg")]
    body = f'S. No.,Product Name,Input Image Urls\r\n1,Shoe,"{",".join(urls)}"\r\n'.encode()

    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("target_ratio", "0.5")
        form.add_field("file", body, filename="products.csv", content_type="text/csv")
        async with http.post(f"{base}/upload", data=form) as response:
            assert response.status == 202, await response.text()
            accepted = await response.json()
        status = await wait_completed(http, base, accepted["request_id"])
        async with http.get(status["output_csv_url"]) as response:
            table = list(csv.reader(io.StringIO(await response.text())))

    assert status["status"] == "Completed"
    assert status["progress"]["images_failed"] == 0
    [product] = status["products"]
    assert product["notes"] == ["", "TARGET_NOT_MET"]
    assert product["output_bytes"][0] <= product["input_bytes"][0] / 2
    assert product["output_bytes"][1] > product["input_bytes"][1] / 2
    assert all(0 < ssim <= 1 for ssim in product["ssim"])
    assert 30 <= product["quality"][0] <= 95
    assert table[1][4] == f"{urls[1]}: TARGET_NOT_MET"
    assert table[1][5] == ",".join(f"{s:.4f}" for s in product["ssim"])


async def check_presigned_outputs(
    http: aiohttp.ClientSession,
    env: dict[str, str],
    csv_urls: list[list[str]],
    status_urls: list[list[str]],
) -> None:
    """The output CSV of an S3 stack: URLs signed for the download, on the S3 server, serving
    the JPEGs; the copy in the store names the objects by their s3:// URLs, which never expire."""

    def objects(table: list[list[str]]) -> list[list[str]]:
        return [[url.partition("?")[0] for url in row] for row in table]

    # Signed again for the download: the same objects as in the status, other signatures.
    assert objects(csv_urls) == objects(status_urls)
    for url in (url for row in csv_urls for url in row):
        assert url.startswith(env["AWS_ENDPOINT_URL"] + "/") and "X-Amz-Signature=" in url
        async with http.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "image/jpeg"
            data = await response.read()
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG"

    storage = Storage.from_config(
        StorageConfig(
            env["IMGPIPE_STORAGE_URL"],
            s3=S3Options(
                endpoint=env["AWS_ENDPOINT_URL"],
                region=env["AWS_REGION"],
                access_key_id=env["AWS_ACCESS_KEY_ID"],
                secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            ),
        )
    )
    request_id = csv_urls[0][0].partition("/requests/")[2].partition("/")[0]
    stored = await storage.get(f"requests/{request_id}/output.csv")
    kept = [row[3].split(",") for row in list(csv.reader(io.StringIO(stored.decode())))[1:]]
    prefix = env["IMGPIPE_STORAGE_URL"] + "/requests/"
    assert [[url.removeprefix(prefix) for url in row] for row in kept] == [
        [url.partition("/requests/")[2] for url in row] for row in objects(csv_urls)
    ]


async def test_bad_csv_and_unknown_id_get_contract_errors(shared: Shared) -> None:
    stack = shared.stack
    bad = (
        b"S. No.,Product Name,Input Image Urls\n"
        b"1,Shoe,http://127.0.0.1:9/a.jpg\n"
        b"2,,http://127.0.0.1:9/b.jpg\n"
        b"3,Hat,not-a-url\n"
    )
    async with aiohttp.ClientSession() as http:
        async with await upload_csv(http, stack.base_url, bad) as response:
            assert response.status == 400
            body = await response.json()
        assert body["error"]["code"] == "invalid_csv"
        assert {(d["row"], d["column"]) for d in body["error"]["details"]} == {
            (3, "Product Name"),
            (4, "Input Image Urls"),
        }
        assert all(d["message"] for d in body["error"]["details"])

        unknown = "3f1c2a4e-0000-4000-8000-000000000000"
        async with http.get(f"{stack.base_url}/status/{unknown}") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"
        async with http.get(f"{stack.base_url}/requests/{unknown}/output.csv") as response:
            assert response.status == 404

        # Idempotent uploads over REST: the same key and bytes replay (200, same id, even
        # when sent at once), other bytes conflict (409).
        # Loopback and not allowed: the worker refuses it without connecting anywhere.
        good = b"S. No.,Product Name,Input Image Urls\n1,Shoe,http://127.0.0.1:9/a.jpg\n"
        headers = {"Idempotency-Key": "order-7", "Content-Type": "text/csv"}

        async def send(body: bytes) -> tuple[int, dict[str, Any]]:
            async with http.post(f"{stack.base_url}/upload", data=body, headers=headers) as r:
                return r.status, await r.json()

        answers = await asyncio.gather(send(good), send(good), send(good))
        assert sorted(status for status, _ in answers) == [200, 200, 202]
        assert len({body["request_id"] for _, body in answers}) == 1
        status, body = await send(good.replace(b"Shoe", b"Boot"))
        assert status == 409 and body["error"]["code"] == "conflict"


async def test_make_run_with_nothing_given_serves_the_readme_sample(
    tmp_path: Path, image_origin: ImageOrigin, stack_factory: list[Stack]
) -> None:
    """`make run` on a fresh machine: embedded Postgres and Redis, the README's sample CSV."""
    stack = start_stack(tmp_path, {"IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{image_origin.port}"})
    stack_factory.append(stack)
    sample = (ROOT / "samples" / "products.csv").read_bytes()
    body = sample.replace(b"http://127.0.0.1:8000/", image_origin.url("/img/").encode())
    async with aiohttp.ClientSession() as http:
        async with await upload_csv(http, stack.base_url, body) as response:
            assert response.status == 202, await response.text()
            request_id = (await response.json())["request_id"]
        status = await wait_completed(http, stack.base_url, request_id)
    assert status["status"] == "Completed"
    assert status["progress"]["images_done"] == 5
    assert (stack.data_dir / "pg").is_dir() and (stack.data_dir / "redis").is_dir()
    assert stack.stop() == 0


async def test_operator_sees_the_queue_and_retries_failed_images(shared: Shared) -> None:
    image_origin, base = shared.origin, shared.stack.base_url
    image_origin.missing.add("/img/later.jpg")
    urls = [image_origin.url("/img/now.jpg"), image_origin.url("/img/later.jpg")]
    body = f'S. No.,Product Name,Input Image Urls\n1,Shoe,"{",".join(urls)}"\n'.encode()
    async with aiohttp.ClientSession() as http:
        async with await upload_csv(http, base, body) as response:
            request_id = (await response.json())["request_id"]
        first = await wait_completed(http, base, request_id)
        assert first["progress"]["images_failed"] == 1
        assert first["products"][0]["errors"][0]["code"] == "HTTP_STATUS"
        assert first["products"][0]["output_image_urls"][1] is None

        async with http.get(f"{base}/queue") as response:
            assert response.status == 200
            queue = await response.json()
        assert set(queue) == {
            "backlog_images",
            "stream_length",
            "in_flight",
            "consumers",
            "dead_letter_length",
            "dead_letters",
            "released_images",
            "owners",
        }
        assert queue["consumers"] >= 2 and queue["dead_letter_length"] == 0

        image_origin.missing.clear()
        async with http.post(f"{base}/requests/{request_id}/retry") as response:
            assert response.status == 202
            retried = await response.json()
        assert (retried["images_retried"], retried["status"]) == (1, "Processing")

        async def all_done() -> dict[str, Any] | None:
            async with http.get(f"{base}/status/{request_id}") as response:
                status: dict[str, Any] = await response.json()
            done = status["status"] == "Completed" and status["progress"]["images_done"] == 2
            return status if done else None

        second = await wait_until_async(all_done, timeout=60, message="retried images done")
        assert second["products"][0]["errors"] == []
        assert all(second["products"][0]["output_image_urls"])

        unknown = "3f1c2a4e-0000-4000-8000-000000000000"
        async with http.post(f"{base}/requests/{unknown}/retry") as response:
            assert response.status == 404


async def read_sse(response: aiohttp.ClientResponse) -> list[tuple[str, dict[str, Any]]]:
    """Every (event, data) of a Server-Sent Events stream, until the server ends it."""
    events: list[tuple[str, dict[str, Any]]] = []
    name, data = "message", ""
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif not line and data:
            events.append((name, json.loads(data)))
            name, data = "message", ""
    return events


async def test_server_sent_events_stream_progress_then_the_final_state(shared: Shared) -> None:
    origin, base = shared.slow_origin, shared.stack.base_url
    urls = [origin.url(f"/img/sse{i}.jpg") for i in range(8)]
    body = f'S. No.,Product Name,Input Image Urls\n1,Shoe,"{",".join(urls)}"\n'.encode()
    async with aiohttp.ClientSession() as http:
        async with await upload_csv(http, base, body) as response:
            request_id = (await response.json())["request_id"]
        async with http.get(f"{base}/requests/{request_id}/events") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = await asyncio.wait_for(read_sse(response), timeout=60)
        async with http.get(
            f"{base}/requests/3f1c2a4e-0000-4000-8000-000000000000/events"
        ) as missing:
            assert missing.status == 404
            assert (await missing.json())["error"]["code"] == "not_found"

    names = [name for name, _ in events]
    assert names[-1] == "final" and set(names[:-1]) <= {"progress"}
    assert len(names) >= 3  # the start, progress along the way, the end
    done = [data["progress"]["images_done"] for _, data in events]
    assert done == sorted(done) and done[-1] == 8
    final = events[-1][1]
    assert final["status"] == "Completed" and final["completed_at"]
    assert final["output_csv_url"] == f"{base}/requests/{request_id}/output.csv"
    assert final["progress"]["percent"] == 100 and final["progress"]["eta_seconds"] is None
