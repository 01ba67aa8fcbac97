"""The object-store interface, over obstore: `file://DIR` by default, `s3://BUCKET[/PREFIX]` at
scale (AWS S3, or any S3-compatible service given its endpoint).

Keys are deterministic (`requests/<request id>/images/<image id>.jpg`), so a task delivered twice
overwrites its own output with the same bytes instead of leaving two outputs.

Output URLs come in two modes. Base: `public_base_url` + key, for a store the gateway serves
(`file://`), a public bucket or a CDN. Presigned (`s3://` only): a GET URL signed with the
store's credentials, valid for `presign_expiry`. Signed URLs expire, so they are made when they
are served (status answers, the output CSV download) and never stored: the output CSV kept in
the store names each image by its permanent URL, `s3://bucket/key`.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

import obstore
from obstore.exceptions import PermissionDeniedError
from obstore.store import LocalStore, S3Store, from_url

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config


def image_key(request_id: uuid.UUID | str, image_id: int, extension: str) -> str:
    return f"requests/{request_id}/images/{image_id}.{extension}"


def output_csv_key(request_id: uuid.UUID | str) -> str:
    return f"requests/{request_id}/output.csv"


def request_prefix(request_id: uuid.UUID | str) -> str:
    """The folder of every object stored for a request: deleting it deletes them all."""
    return f"requests/{request_id}/"


# Objects listed and deleted per round of delete_prefix.
DELETE_BATCH = 1000


_IMAGE_KEY = re.compile(r"requests/[0-9a-f-]{36}/images/\d+\.[a-z]+")


def is_image_key(key: str) -> bool:
    """Whether `key` names a stored output image: written once, never changed, unlike the
    output CSV, which a retry renders again under the same key."""
    return _IMAGE_KEY.fullmatch(key) is not None


@dataclass(frozen=True, slots=True)
class S3Options:
    """How to reach an S3-compatible service. Empty fields are left to obstore: the AWS
    regional endpoint, us-east-1, and the credentials of the environment's role (web
    identity, ECS or EC2 instance metadata)."""

    endpoint: str = ""  # http:// is allowed when given explicitly (a local SeaweedFS or MinIO)
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Where outputs are stored and how callers reach them (read in services.common.config)."""

    url: str
    public_base_url: str = ""
    # Presigned mode when set: output URLs are signed when served, valid this many seconds.
    presign_expiry: int | None = None
    s3: S3Options = field(default_factory=S3Options)


@dataclass(frozen=True, slots=True)
class Storage:
    url: str
    store: obstore.store.ObjectStore
    public_base_url: str = ""
    presign_expiry: timedelta | None = None  # None: base mode

    @classmethod
    def from_config(cls, config: StorageConfig) -> Storage:
        store: obstore.store.ObjectStore
        if config.url.startswith("file://"):
            # obstore wants the directory to exist (mkdir=True) and an absolute path.
            store = LocalStore(Path(unquote(urlsplit(config.url).path)).resolve(), mkdir=True)
        elif config.url.startswith("s3://"):
            store = _s3_store(config.url, config.s3)
        else:
            store = from_url(config.url)  # memory:// in tests
        expiry = None
        if config.presign_expiry is not None:
            if not isinstance(store, S3Store):
                raise ValueError(f"presigned URLs need an s3:// store, not {config.url}")
            expiry = timedelta(seconds=config.presign_expiry)
        return cls(config.url, store, config.public_base_url, expiry)

    @classmethod
    def from_url(cls, url: str, public_base_url: str = "") -> Storage:
        """A store in base mode, configured by `url` alone (and the environment, for S3)."""
        return cls.from_config(StorageConfig(url, public_base_url))

    @property
    def presigned(self) -> bool:
        return self.presign_expiry is not None

    @property
    def local_root(self) -> Path | None:
        """The directory of a file:// store (the gateway serves it under /files/)."""
        if isinstance(self.store, LocalStore):
            return Path(unquote(urlsplit(self.url).path)).resolve()
        return None

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        if isinstance(self.store, LocalStore):
            # LocalStore cannot keep attributes; the gateway derives the type from the name.
            await obstore.put_async(self.store, key, data)
        else:
            await obstore.put_async(
                self.store, key, data, attributes={"Content-Type": content_type}
            )

    async def copy(self, source: str, destination: str) -> None:
        """Copy an object inside the store (server-side on S3: the bytes do not travel), with
        its attributes; FileNotFoundError when `source` does not exist."""
        await obstore.copy_async(self.store, source, destination)

    async def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when it does not exist."""
        result = await obstore.get_async(self.store, key)
        return bytes(await result.bytes_async())

    async def read(self, key: str, piece: int = 64 * 1024) -> tuple[int, AsyncIterator[bytes]]:
        """The object's size and its bytes in pieces of `piece` (the last one shorter), read
        as they are taken; FileNotFoundError when it does not exist."""
        result = await obstore.get_async(self.store, key)

        async def pieces() -> AsyncIterator[bytes]:
            async for chunk in result.stream(min_chunk_size=piece):
                yield bytes(chunk)

        return int(result.meta["size"]), pieces()

    async def missing(self, key: str) -> bool:
        """True when the store says `key` does not exist. Without s3:ListBucket, S3 answers a
        missing object with 403: that is not known to be missing (False)."""
        try:
            await obstore.head_async(self.store, key)
        except FileNotFoundError:
            return True
        except PermissionDeniedError:
            return False
        return False

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete `keys`; one already gone is not an error."""
        if keys:
            with contextlib.suppress(FileNotFoundError):
                await obstore.delete_async(self.store, list(keys))

    async def delete_prefix(self, prefix: str) -> tuple[int, int]:
        """Delete every object whose key starts with the folder `prefix` (ending in "/"),
        whoever wrote it; returns (objects, bytes) deleted. Lists again after each batch, so
        memory is one batch and a delete that is interrupted is finished by the next call."""
        objects = size = 0
        while True:
            stream = obstore.list(self.store, prefix, chunk_size=DELETE_BATCH)
            page = await anext(aiter(stream), None)
            if not page:
                break
            await self.delete([meta["path"] for meta in page])
            objects += len(page)
            size += sum(meta["size"] for meta in page)
        root = self.local_root
        if root is not None:
            # A file store keeps the emptied folders: remove them too, deepest first.
            _remove_empty_folders(root / prefix)
        return objects, size

    async def probe(self) -> None:
        """Raise if the store cannot be reached (a missing probe object is fine).

        Without s3:ListBucket, S3 answers a missing object with 403 instead of 404: an answer
        either way, so the store is up. Bad credentials show up on the first put instead.
        """
        with contextlib.suppress(FileNotFoundError, PermissionDeniedError):
            await obstore.head_async(self.store, ".imgpipe-probe")

    async def public_urls(self, keys: Sequence[str]) -> list[str]:
        """The URLs callers fetch `keys` at, in order; in presigned mode, signed now."""
        if self.presign_expiry is None:
            return [self._base_url(key) for key in keys]
        if not keys:
            return []
        assert isinstance(self.store, S3Store)  # from_config allows presigning nothing else
        # Signing is local (HMAC), unless the credentials must be fetched or refreshed first.
        return list(await obstore.sign_async(self.store, "GET", list(keys), self.presign_expiry))

    async def public_url(self, key: str) -> str:
        return (await self.public_urls([key]))[0]

    def permanent_url(self, key: str) -> str:
        """A URL for `key` that does not expire, for what is stored: the public URL in base
        mode, the object's own `s3://bucket/key` in presigned mode."""
        if self.presign_expiry is None:
            return self._base_url(key)
        return self.url.rstrip("/") + "/" + quote(key)

    def _base_url(self, key: str) -> str:
        return self.public_base_url.rstrip("/") + "/" + quote(key)


def _remove_empty_folders(folder: Path) -> None:
    for path, _, _ in sorted(os.walk(folder), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):  # not empty (a write raced the delete): kept
            os.rmdir(path)


def _s3_store(url: str, options: S3Options) -> S3Store:
    """An S3Store for `url` with `options` on top of what obstore reads from AWS_* itself."""
    config: S3Config = {}
    client: ClientConfig = {}
    if options.endpoint:
        config["endpoint"] = options.endpoint
        client["allow_http"] = options.endpoint.startswith("http://")
    if options.region:
        config["region"] = options.region
    if options.access_key_id:
        config["access_key_id"] = options.access_key_id
        config["secret_access_key"] = options.secret_access_key
        if options.session_token:
            config["session_token"] = options.session_token
    return S3Store.from_url(url, config=config, client_options=client or None)
