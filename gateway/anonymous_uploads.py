"""Uploads in progress per client address, counted when authentication is off.

With no key to count uploads against, ingest cannot apply IMGPIPE_LIMIT_UPLOADS; the gateway
itself allows each client address that many uploads at a time (gateway/upload.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from services.common.errors import Detail, RateLimited

# When an address's upload may end is unknown; it is told to try again after this long.
_UPLOADS_RETRY_AFTER = 5


class AnonymousUploads:
    """Uploads in progress per client address, for when authentication is off (one gateway
    process; an entry exists only while its address has an upload in progress)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, address: str) -> Iterator[None]:
        held = self._held.get(address, 0)
        if 0 < self.limit <= held:
            raise RateLimited(
                f"this address already has {held} uploads in progress (IMGPIPE_LIMIT_UPLOADS="
                f"{self.limit}); retry when one of them has been answered",
                [Detail(f"at most {self.limit} uploads at a time", "uploads")],
                retry_after=_UPLOADS_RETRY_AFTER,
            )
        self._held[address] = held + 1
        try:
            yield
        finally:
            if self._held[address] <= 1:
                del self._held[address]
            else:
                self._held[address] -= 1
