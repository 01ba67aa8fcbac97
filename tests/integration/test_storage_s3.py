"""Storage against a real S3 server (SeaweedFS on 127.0.0.1): objects, probes and public URLs.

Each test works under a prefix of its own in the session's buckets, so tests never meet.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import aiohttp
import obstore.exceptions
import pytest

from services.common.dependencies import PROBE_TIMEOUT
from services.common.storage import Storage, StorageConfig
from testing.polling import wait_until_async
from testing.ports import free_tcp_port
from testing.seaweed import BUCKET, PUBLIC_BUCKET, SeaweedS3

pytestmark = pytest.mark.integration

JPEG = b"\xff\xd8\xff\xe0 not really a JPEG, but S3 does not look"


def prefix() -> str:
    return f"test-{secrets.token_hex(4)}"


def presigned(seaweed: SeaweedS3, expiry: int = 3600, url: str = "") -> Storage:
    """A presigned-mode store in the private bucket, under a new prefix unless `url` is given."""
    url = url or f"s3://{BUCKET}/{prefix()}"
    return Storage.from_config(StorageConfig(url, presign_expiry=expiry, s3=seaweed.s3_options))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with http.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.read()


async def test_objects_round_trip_with_their_content_type(
    seaweed: SeaweedS3, http: aiohttp.ClientSession
) -> None:
    storage = presigned(seaweed)
    key = "requests/r1/images/1.jpg"
    await storage.put(key, JPEG, "image/jpeg")
    await storage.put("requests/r1/output.csv", b"S. No.\r\n", "text/csv")

    assert await storage.get(key) == JPEG
    assert await storage.get("requests/r1/output.csv") == b"S. No.\r\n"
    await storage.put(key, JPEG + b"!", "image/jpeg")  # a redelivered task overwrites
    assert await storage.get(key) == JPEG + b"!"
    status, content_type, _ = await fetch(http, await storage.public_url(key))
    assert (status, content_type) == (200, "image/jpeg")
    with pytest.raises(FileNotFoundError):
        await storage.get("requests/r1/images/2.jpg")
    # The prefix in the URL keeps another store's objects apart.
    with pytest.raises(FileNotFoundError):
        await presigned(seaweed).get(key)


async def test_a_copy_is_made_in_the_store_with_its_content_type(
    seaweed: SeaweedS3, http: aiohttp.ClientSession
) -> None:
    storage = presigned(seaweed)
    await storage.put("requests/r1/images/1.jpg", JPEG, "image/jpeg")

    # Reuse across requests (services/worker/dedup.py): the copy is under the new request's key.
    await storage.copy("requests/r1/images/1.jpg", "requests/r2/images/7.jpg")

    assert await storage.get("requests/r2/images/7.jpg") == JPEG
    status, content_type, _ = await fetch(
        http, await storage.public_url("requests/r2/images/7.jpg")
    )
    assert (status, content_type) == (200, "image/jpeg")
    with pytest.raises(FileNotFoundError):
        await storage.copy("requests/r1/images/gone.jpg", "requests/r2/images/8.jpg")


async def test_probe_answers_while_the_server_does_and_fails_without_it(
    seaweed: SeaweedS3,
) -> None:
    await presigned(seaweed).probe()  # no probe object: still reachable
    wrong_secret = replace(seaweed.s3_options, secret_access_key="wrong")
    denied = Storage.from_config(StorageConfig(f"s3://{BUCKET}", s3=wrong_secret))
    await denied.probe()  # S3 answered (403): reachable; the first put says what is wrong
    with pytest.raises(obstore.exceptions.PermissionDeniedError):
        await denied.put("x.jpg", JPEG, "image/jpeg")

    nowhere = replace(seaweed.s3_options, endpoint=f"http://127.0.0.1:{free_tcp_port()}")
    down = Storage.from_config(StorageConfig(f"s3://{BUCKET}", s3=nowhere))
    # As the dependency monitor probes: no answer within the timeout means down.
    with pytest.raises((TimeoutError, OSError, obstore.exceptions.BaseError)):
        await asyncio.wait_for(down.probe(), timeout=PROBE_TIMEOUT)


async def test_base_mode_urls_are_the_base_plus_the_key_on_a_public_bucket(
    seaweed: SeaweedS3, http: aiohttp.ClientSession
) -> None:
    folder = prefix()
    base = f"{seaweed.endpoint}/{PUBLIC_BUCKET}/{folder}/"
    storage = Storage.from_config(
        StorageConfig(f"s3://{PUBLIC_BUCKET}/{folder}", public_base_url=base, s3=seaweed.s3_options)
    )
    key = "requests/r1/images/1.jpg"
    await storage.put(key, JPEG, "image/jpeg")

    assert not storage.presigned
    assert await storage.public_urls([key, "a b.jpg"]) == [base + key, base + "a%20b.jpg"]
    assert storage.permanent_url(key) == base + key
    assert await fetch(http, base + key) == (200, "image/jpeg", JPEG)  # anonymous: public
    private = presigned(seaweed)
    await private.put(key, JPEG, "image/jpeg")
    unsigned = (await private.public_url(key)).partition("?")[0]
    assert (await fetch(http, unsigned))[0] == 403  # the private bucket wants a signature


async def test_presigned_urls_are_fetchable_and_bound_to_their_key(
    seaweed: SeaweedS3, http: aiohttp.ClientSession
) -> None:
    storage = presigned(seaweed, expiry=600)
    keys = ["requests/r1/images/1.jpg", "requests/r1/images/2.webp"]
    await storage.put(keys[0], JPEG, "image/jpeg")
    await storage.put(keys[1], b"RIFF....WEBP", "image/webp")

    urls = await storage.public_urls(keys)
    assert await storage.public_urls([]) == []
    assert urls[0].startswith(f"{seaweed.endpoint}/{BUCKET}/")
    query = parse_qs(urlsplit(urls[0]).query)
    assert query["X-Amz-Expires"] == ["600"]
    assert query["X-Amz-Credential"][0].startswith(seaweed.access_key_id + "/")
    assert await fetch(http, urls[0]) == (200, "image/jpeg", JPEG)
    assert await fetch(http, urls[1]) == (200, "image/webp", b"RIFF....WEBP")
    # What is stored never expires: the object's own s3:// URL, not a signed one.
    assert storage.permanent_url(keys[0]) == f"{storage.url}/{keys[0]}"

    signature = query["X-Amz-Signature"][0]
    tampered = urls[0].replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    assert (await fetch(http, tampered))[0] == 403
    other_key = urls[0].replace("/1.jpg?", "/2.webp?")  # a signature is for one key only
    assert (await fetch(http, other_key))[0] == 403


async def test_an_expired_presigned_url_is_refused(
    seaweed: SeaweedS3, http: aiohttp.ClientSession
) -> None:
    storage = presigned(seaweed, expiry=1)
    key = "requests/r1/images/1.jpg"
    await storage.put(key, JPEG, "image/jpeg")
    url = await storage.public_url(key)

    async def refused() -> bytes | None:
        status, _, body = await fetch(http, url)
        return body if status == 403 else None

    body = await wait_until_async(refused, timeout=15, interval=0.25, message="URL to expire")
    assert b"expired" in body.lower()
    # The same object, signed again, is served: only the old URL lapsed.
    again = presigned(seaweed, expiry=600, url=storage.url)
    assert await fetch(http, await again.public_url(key)) == (200, "image/jpeg", JPEG)
