"""What each caller has in progress in this gateway process, capped per caller.

- Uploads, when authentication is off: with no key to count uploads against, ingest cannot
  apply IMGPIPE_LIMIT_UPLOADS, so the gateway allows each client address that many at a time
  (gateway/upload.py).
- Output CSV downloads (IMGPIPE_GATEWAY_DOWNLOADS), by credential, or by address without one:
  each holds up to a page of rows while its client reads, so a caller that opens many and
  stops reading cannot gather the gateway's memory (gateway/handlers.py `output_csv`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from services.common.errors import Detail, RateLimited

# When a caller's upload or download may end is unknown; it is told to try again after this long.
_RETRY_AFTER = 5


class Holds:
    """At most `limit` (0: no limit) of `what` in progress per caller, in one gateway process;
    an entry exists only while its caller has one, so memory follows the callers at work."""

    def __init__(self, limit: int, what: str, setting: str) -> None:
        self.limit = limit
        self.what = what
        self.setting = setting
        self._held: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, caller: str) -> Iterator[None]:
        held = self._held.get(caller, 0)
        if 0 < self.limit <= held:
            raise RateLimited(
                f"this caller already has {held} {self.what} in progress ({self.setting}="
                f"{self.limit}); retry when one of them has ended",
                [Detail(f"at most {self.limit} {self.what} at a time", self.what)],
                retry_after=_RETRY_AFTER,
            )
        self._held[caller] = held + 1
        try:
            yield
        finally:
            if self._held[caller] <= 1:
                del self._held[caller]
            else:
                self._held[caller] -= 1

    def held(self, caller: str) -> int:
        return self._held.get(caller, 0)
