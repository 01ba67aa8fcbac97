"""List and delete, end to end: GET /requests paged newest first with a status filter, each
owner seeing only their own; DELETE /requests/{id} removing the rows and every stored object
on file:// and on SeaweedFS, after which every URL of the request answers 404."""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import obstore
import pytest
import redis.asyncio

from services.common.auth import key_hash, new_key
from services.common.db.lifecycle import EventWindow
from services.common.deletion import delete_events
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.storage import Storage, StorageConfig
from services.common.streams import EVENT_FIELD, StreamNames
from testing.origin import ImageOrigin
from testing.polling import wait_until_async
from testing.seaweed import BUCKET, SeaweedS3
from testing.stack import Stack, run_cli, start_stack
from tests.e2e.test_pipeline import upload_csv, wait_completed
from tests.lifecycle.test_cancel import csv_of

pytestmark = pytest.mark.timeout(240)


async def _upload(
    http: aiohttp.ClientSession, base: str, urls: list[str], headers: dict[str, str]
) -> str:
    form = aiohttp.FormData()
    form.add_field("file", csv_of(urls), filename="p.csv", content_type="text/csv")
    async with http.post(f"{base}/upload", data=form, headers=headers) as response:
        assert response.status == 202, await response.text()
        request_id: str = (await response.json())["request_id"]
    return request_id


async def _wait_final(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
    async def final() -> bool:
        async with http.get(url, headers=headers) as response:
            assert response.status == 200, await response.text()
            return bool((await response.json())["completed_at"])

    await wait_until_async(final, timeout=90, interval=0.2, message=f"{url} final")


async def _pages(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    token: str | None = ""
    while token is not None:
        async with http.get(f"{url}&page_token={token}", headers=headers) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        pages.append(body["requests"])
        token = body["next_page_token"]
    return pages


async def test_list_pages_newest_first_filters_and_hides_other_owners(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    image_origin: ImageOrigin,
    stack_factory: list[Stack],
) -> None:
    acme, globex = new_key(), new_key()
    stack = start_stack(
        tmp_path,
        {
            "IMGPIPE_DATABASE_URL": database_url,
            "IMGPIPE_REDIS_URL": redis_server_url,
            "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{image_origin.port}",
            "IMGPIPE_DEV_WORKERS": "1",
            "IMGPIPE_API_KEYS": f"acme:{key_hash(acme)} rate=0, globex:{key_hash(globex)} rate=0",
        },
    )
    stack_factory.append(stack)
    base = stack.base_url
    as_acme, as_globex = {"Authorization": f"Bearer {acme}"}, {"Authorization": f"Bearer {globex}"}
    async with aiohttp.ClientSession() as http:
        ids = [
            await _upload(http, base, [image_origin.url(f"/img/l{i}.jpg")], as_acme)
            for i in range(5)
        ]
        theirs = await _upload(http, base, [image_origin.url("/img/g.jpg")], as_globex)
        for request_id in ids:
            async with http.get(f"{base}/status/{request_id}", headers=as_acme) as response:
                assert response.status == 200
        pages = await _pages(http, f"{base}/requests?page_size=2", as_acme)
        assert [len(page) for page in pages] == [2, 2, 1]
        listed = [item for page in pages for item in page]
        assert [item["request_id"] for item in listed] == ids[::-1]  # newest first
        first = listed[0]
        assert first["products"] == 1 and first["images"] == 1
        assert first["status_url"] == f"{base}/status/{ids[-1]}"
        assert set(first["progress"]) >= {"images_total", "images_done", "images_failed"}

        # Once all are finished, the status filter keeps them all as Completed, and no other.
        for request_id in ids:
            await _wait_final(http, f"{base}/status/{request_id}", as_acme)
        [completed] = await _pages(http, f"{base}/requests?status=Completed", as_acme)
        assert [item["request_id"] for item in completed] == ids[::-1]
        async with http.get(f"{base}/requests?status=Cancelled", headers=as_acme) as response:
            assert (await response.json())["requests"] == []
        async with http.get(f"{base}/requests?status=Nope", headers=as_acme) as response:
            assert response.status == 400
        async with http.get(f"{base}/requests?page_token=bogus", headers=as_acme) as response:
            assert response.status == 400

        # The page's list: the same requests, each linking to its status page.
        async with http.get(f"{base}/ui/requests", headers=as_acme) as response:
            assert response.status == 200
            page = await response.text()
        assert [page.index(f"/ui/requests/{i}") for i in ids[::-1]] == sorted(
            page.index(f"/ui/requests/{i}") for i in ids
        )
        assert theirs not in page

        # The same through the CLI: a page of two, cancel of a finished request (409: exit 5),
        # delete (exit 0), then every page without the deleted one.
        code, out = await run_cli(base, "--json", "list", "--page-size", "2", key=acme)
        assert code == 0, out
        assert [r["request_id"] for r in json.loads(out)["requests"]] == ids[:-3:-1]
        code, out = await run_cli(base, "cancel", ids[0], key=acme)
        assert code == 5, out
        code, out = await run_cli(base, "delete", ids[0], key=acme)
        assert code == 0, out
        code, out = await run_cli(base, "--json", "list", "--all", key=acme)
        assert code == 0, out
        assert [r["request_id"] for r in json.loads(out)["requests"]] == ids[:0:-1]
        code, out = await run_cli(base, "delete", ids[0], key=acme)
        assert code == 4, out

        # Another owner's request is a 404 for each operation, exactly like a missing one.
        [[only]] = await _pages(http, f"{base}/requests?page_size=10", as_globex)
        assert only["request_id"] == theirs
        missing = "00000000-0000-4000-8000-000000000000"
        for request_id in (theirs, missing):
            for method, path in (
                ("GET", f"/status/{request_id}"),
                ("POST", f"/requests/{request_id}/cancel"),
                ("DELETE", f"/requests/{request_id}"),
            ):
                async with http.request(method, f"{base}{path}", headers=as_acme) as response:
                    assert response.status == 404, (method, path, await response.text())
                    assert (await response.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize("storage_env", ["file", "s3"], indirect=True)
async def test_delete_removes_rows_and_every_stored_object(
    image_origin: ImageOrigin,
    origin_stack: Stack,
    storage_env: dict[str, str],
    request: pytest.FixtureRequest,
) -> None:
    base = origin_stack.base_url
    store = _store(storage_env, origin_stack, request)
    async with aiohttp.ClientSession() as http:
        urls = [image_origin.url(f"/img/d{i}.jpg") for i in range(6)]
        response = await upload_csv(http, base, csv_of(urls))
        assert response.status == 202, await response.text()
        request_id = (await response.json())["request_id"]
        final = await wait_completed(http, base, request_id)
        async with http.get(f"{base}/status/{request_id}") as got:
            products = (await got.json())["products"]
        outputs = [url for product in products for url in product["output_image_urls"]]
        assert len(outputs) == 6 and all(outputs)
        assert len(await _keys(store, request_id)) == 7  # six outputs and the output CSV
        async with http.get(outputs[0]) as got:
            assert got.status == 200

        async with http.delete(f"{base}/requests/{request_id}") as answer:
            assert answer.status == 204, await answer.text()
        assert await _keys(store, request_id) == []
        if store.local_root is not None:
            assert not (store.local_root / "requests" / request_id).exists()
        for url in (f"{base}/status/{request_id}", final["output_csv_url"], *outputs):
            async with http.get(url) as got:
                assert got.status == 404, url
        async with http.delete(f"{base}/requests/{request_id}") as answer:
            assert answer.status == 404


async def test_delete_removes_the_request_events_and_keeps_the_others(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    image_origin: ImageOrigin,
    stack_factory: list[Stack],
) -> None:
    names = StreamNames(f"{redis_prefix}:{secrets.token_hex(4)}")
    stack = start_stack(
        tmp_path,
        {
            "IMGPIPE_DATABASE_URL": database_url,
            "IMGPIPE_REDIS_URL": redis_server_url,
            "IMGPIPE_REDIS_PREFIX": names.prefix,
            "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{image_origin.port}",
            "IMGPIPE_DEV_WORKERS": "1",
            # No reconciler pass: it trims acknowledged events, which would leave nothing to
            # tell the deleted request's entries from the kept ones.
            "IMGPIPE_RECONCILE_INTERVAL": "3600",
        },
    )
    stack_factory.append(stack)
    base = stack.base_url
    async with (
        aiohttp.ClientSession() as http,
        redis.asyncio.Redis.from_url(redis_server_url) as client,
    ):
        urls = [image_origin.url(f"/img/e{i}.jpg") for i in range(3)]
        ids = [await _upload(http, base, [url], {}) for url in urls]
        for request_id in ids:
            await wait_completed(http, base, request_id)

        async def events_of() -> dict[str, int]:
            """request id: its entries on the events stream."""
            counts: dict[str, int] = {}
            entries: Any = await client.xrange(names.events)
            for _, fields in entries:
                event = request_pb2.RequestEvent.FromString(fields[EVENT_FIELD])
                counts[event.request_id] = counts.get(event.request_id, 0) + 1
            return counts

        async def all_published() -> dict[str, int] | None:
            counts = await events_of()
            return counts if set(ids) <= set(counts) else None

        # request.finished goes on the stream after the status is final: waited for.
        before = await wait_until_async(all_published, timeout=30, interval=0.1, message="events")
        async with http.delete(f"{base}/requests/{ids[1]}") as answer:
            assert answer.status == 204, await answer.text()
        after = await events_of()
        assert ids[1] not in after
        assert after == {k: v for k, v in before.items() if k != ids[1]}
        # Repeating the step (a delete resumed after a crash) finds nothing more.
        window = EventWindow(datetime.now(UTC) - timedelta(hours=1), None)
        assert await delete_events(client, names, uuid.UUID(ids[1]), window) == 0
        assert await events_of() == after


def _store(storage_env: dict[str, str], stack: Stack, request: pytest.FixtureRequest) -> Storage:
    """The stack's object store, read directly."""
    if not storage_env:
        return Storage.from_url((stack.data_dir / "store").as_uri())
    server: SeaweedS3 = request.getfixturevalue("seaweed")
    url = storage_env["IMGPIPE_STORAGE_URL"]
    assert url.startswith(f"s3://{BUCKET}/")
    return Storage.from_config(StorageConfig(url, s3=server.s3_options))


async def _keys(store: Storage, request_id: str) -> list[str]:
    found: list[str] = []
    async for page in obstore.list(store.store, f"requests/{request_id}/"):
        found.extend(meta["path"] for meta in page)
    return found
