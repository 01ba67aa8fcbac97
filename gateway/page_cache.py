"""Rendered product pages of GET /status, kept while the request they show has not changed.

A status poll reads the request head (one row) and a page of products (up to 1000 products
with their images). The page is the expensive part, in Postgres, in the status service and in
JSON, yet it only changes when an image of the request becomes final or is retried, and every
such change moves the request's counters or its `updated_at`. So the head is read on every
poll, and the page is rendered again only when that version moved.

The head is read first, on every poll and with the caller's credentials, so a cached page is
never shown to someone who could not read the request. Entries also expire after `max_age`,
so output URLs that are signed with an expiry are refreshed well before they lapse.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from services.common.pb.imgpipe.v1 import request_pb2


@dataclass(frozen=True, slots=True)
class PageKey:
    request_id: str
    page_size: int
    page_token: str


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


class PageCache:
    """A bounded LRU of rendered product pages."""

    def __init__(
        self,
        max_entries: int = 512,
        max_age: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self._clock = clock
        self._entries: OrderedDict[PageKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def known(self, key: PageKey) -> bool:
        """Whether a page is kept for `key` at all (its version is checked by `get`)."""
        return key in self._entries

    def get(self, key: PageKey, version: Version) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.version != version or self._clock() - entry.stored_at > self.max_age:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.body

    def put(self, key: PageKey, version: Version, body: bytes) -> None:
        self._entries[key] = _Entry(version, body, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


PAGES = web.AppKey("pages", PageCache)
