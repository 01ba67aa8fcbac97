"""Per-image outcome codes shared by fetch and imaging (docs/architecture.md, "Image processing").

Fetching and compressing raise `ImageFailure`; the worker records `code` and `message` on the
image row and retries only when `transient` is true.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass


class OutcomeCode(enum.StrEnum):
    HTTP_STATUS = "HTTP_STATUS"
    TIMEOUT = "TIMEOUT"
    CONNECTION = "CONNECTION"
    TOO_MANY_REDIRECTS = "TOO_MANY_REDIRECTS"
    BLOCKED_ADDRESS = "BLOCKED_ADDRESS"
    TOO_LARGE = "TOO_LARGE"
    NOT_AN_IMAGE = "NOT_AN_IMAGE"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    DECOMPRESSION_BOMB = "DECOMPRESSION_BOMB"
    CORRUPT_IMAGE = "CORRUPT_IMAGE"
    INTERNAL = "INTERNAL"
    # The request was cancelled before the image was processed (docs/lifecycle.md).
    CANCELLED = "CANCELLED"


class ImageFailure(Exception):
    """A classified per-image failure."""

    def __init__(
        self,
        code: OutcomeCode,
        message: str,
        *,
        transient: bool = False,
        retry_after: float | None = None,
        sent: bool = True,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.transient = transient
        self.retry_after = retry_after
        # False when nothing reached the origin (it asked us to wait): not an attempt.
        self.sent = sent

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"ImageFailure({self.code.value!r}, {self.message!r}, "
            f"transient={self.transient}, retry_after={self.retry_after}, sent={self.sent})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        # The keyword-only arguments would be lost by the default exception pickling.
        return (_rebuild, (self.code, self.message, self.transient, self.retry_after, self.sent))


def _rebuild(
    code: OutcomeCode, message: str, transient: bool, retry_after: float | None, sent: bool
) -> ImageFailure:
    return ImageFailure(code, message, transient=transient, retry_after=retry_after, sent=sent)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a task retries transient fetch failures (exponential backoff with full jitter)."""

    max_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 10.0
    # Waiting for an origin's Retry-After cooldown: how often, and how long at most each time.
    max_cooldown_waits: int = 3
    max_wait: float = 60.0
    # Giving the slot back while every connection to the origin is busy: how often. After
    # that, the image's task waits in its slot for as long as the connection takes.
    max_busy_waits: int = 10

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter; an origin's Retry-After wins when longer."""
        backoff = random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
        return max(backoff, min(retry_after or 0.0, self.max_wait))
