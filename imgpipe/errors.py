"""The one error type of the client: an error answer from the server, or no answer at all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Statuses worth asking again for, with no answer (None) being one of them.
RETRYABLE_STATUSES = frozenset({None, 502, 503, 504})


@dataclass
class ApiError(Exception):
    """An error answer (`status` is its HTTP status) or no answer at all (`status` None).

    `code`, `message` and `details` are the server's JSON error body when it sent one.
    """

    status: int | None
    code: str
    message: str
    details: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES

    def body(self) -> dict[str, Any]:
        """The error as the API's JSON error body."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def unreachable(base_url: str, exc: BaseException) -> ApiError:
    """The error for no answer from the server at `base_url`."""
    why = "timed out" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
    return ApiError(None, "unavailable", f"cannot reach the imgpipe server at {base_url}: {why}")
