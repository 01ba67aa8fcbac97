"""Rendered pages of products of GET /status, kept while the request they show has not changed.

"Page" here is a page of the product list (`page_size` products after a position), not an HTML
page (gateway/html_pages.py).

A status poll reads the request head (one row) and a page of products (up to 1000 products
with their images). The page is the expensive part, in Postgres, in the status service and in
JSON, yet it only changes when an image of the request becomes final or is retried, and every
such change moves the request's counters or its `updated_at`. So the head is read on every
poll, and the page is rendered again only when that version moved.

The head is read first, on every poll and with the caller's credentials, so a cached page is
never shown to someone who could not read the request. Entries also expire after `max_age`,
so output URLs that are signed with an expiry are refreshed well before they lapse.

Memory is bounded by bytes, not only by entries (IMGPIPE_PAGE_CACHE_BYTES): a page of 1000
products with long URLs can be tens of MiB. A body larger than `1/LARGE_FRACTION` of the cap is
never kept (one caller's big pages would evict everyone's), pages are keyed on the decoded
position rather than the token's text (services/common/page_token.py refuses other spellings
too), and expired entries are removed, not merely skipped, so an idle gateway gives the memory
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from services.common.pb.imgpipe.v1 import request_pb2

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# A body over max_bytes / LARGE_FRACTION is rendered for its caller and not kept.
LARGE_FRACTION = 8


@dataclass(frozen=True, slots=True)
class ProductPageKey:
    request_id: str
    page_size: int
    after_row: int  # the decoded page token: one key per position, whatever the spelling


@dataclass(frozen=True, slots=True)
class Version:
    status: int
    images_done: int
    images_failed: int
    updated_at: tuple[int, int]

    @classmethod
    def of(cls, request: request_pb2.Request) -> Version:
        progress = request.progress
        return cls(
            request.status,
            progress.images_done,
            progress.images_failed,
            (request.updated_at.seconds, request.updated_at.nanos),
        )


@dataclass(frozen=True, slots=True)
class _Entry:
    version: Version
    body: bytes  # the JSON members `"products":[...],"next_page_token":...`
    stored_at: float


class ProductPageCache:
    """A bounded LRU of rendered product pages: at most `max_entries` pages and `max_bytes` of
    bodies, none kept longer than `max_age` seconds."""

    def __init__(
        self,
        max_entries: int = 512,
        max_age: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[ProductPageKey, _Entry] = OrderedDict()
        self._size = 0
        self._purged_at = clock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size(self) -> int:
        """The bytes of the bodies kept."""
        return self._size

    def known(self, key: ProductPageKey) -> bool:
        """Whether a page is kept for `key` at all (its version is checked by `get`)."""
        self._purge_expired()
        return key in self._entries

    def get(self, key: ProductPageKey, version: Version) -> bytes | None:
        self._purge_expired()
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.version != version or self._expired(entry):
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.body

    def put(self, key: ProductPageKey, version: Version, body: bytes) -> None:
        """Keep `body` for `key`, unless it is too large to keep; least recently read first out."""
        self._purge_expired()
        if key in self._entries:
            self._drop(key)
        if len(body) > self.max_bytes // LARGE_FRACTION:
            return
        self._entries[key] = _Entry(version, body, self._clock())
        self._size += len(body)
        while len(self._entries) > self.max_entries or self._size > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _expired(self, entry: _Entry) -> bool:
        return self._clock() - entry.stored_at > self.max_age

    def _drop(self, key: ProductPageKey) -> None:
        self._size -= len(self._entries.pop(key).body)

    def purge_expired(self) -> None:
        """Remove every expired entry."""
        self._purged_at = -math.inf
        self._purge_expired()

    def _purge_expired(self) -> None:
        # Entries are in order of reading, not of storing, so finding the expired ones is a
        # scan; done at most a few times per max_age, it costs nothing per call.
        now = self._clock()
        if now - self._purged_at < self.max_age / 4:
            return
        self._purged_at = now
        for key in [key for key, entry in self._entries.items() if self._expired(entry)]:
            self._drop(key)


@contextlib.asynccontextmanager
async def purging_expired(pages: ProductPageCache) -> AsyncIterator[None]:
    """While inside, expired pages are removed even when nobody polls, so the memory of a
    burst of polls is given back within `max_age`."""

    async def purge() -> None:
        while True:
            await asyncio.sleep(pages.max_age / 4)
            pages.purge_expired()

    task = asyncio.create_task(purge())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
