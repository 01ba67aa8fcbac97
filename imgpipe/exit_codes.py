"""Exit codes of the `imgpipe` command and how outcomes map onto them. Pure functions."""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class Exit(IntEnum):
    OK = 0
    REQUEST_FAILED = 1
    USAGE = 2
    INVALID = 3
    NOT_FOUND = 4
    CONFLICT = 5
    UNAVAILABLE = 6
    SOME_FAILED = 7
    UNAUTHORIZED = 8
    ERROR = 9
    CANCELLED = 10


EXIT_CODES_HELP = """\
exit codes:
  0  success (with --wait: the request Completed and no image failed)
  1  the request Failed: every image failed (with --wait)
  2  usage error: bad arguments, or a local file that cannot be read or written
  3  validation error (400, 413, 415): an invalid CSV prints every row and column
  4  not found (404)
  5  conflict (409): e.g. the output CSV of a request that is not finished yet, cancelling a
     request that is final, deleting one that is not
  6  server unavailable: 503, 502, 504, 429, connection refused, or a timeout
  7  the request Completed with some images failed (with --wait)
  8  not authorized (401, 403): check --api-key or IMGPIPE_API_KEY
  9  any other error answer from the server (e.g. 500)
  10  the request was Cancelled (with --wait)"""

_BY_HTTP_STATUS = {
    400: Exit.INVALID,
    401: Exit.UNAUTHORIZED,
    403: Exit.UNAUTHORIZED,
    404: Exit.NOT_FOUND,
    409: Exit.CONFLICT,
    413: Exit.INVALID,
    415: Exit.INVALID,
    422: Exit.INVALID,
    429: Exit.UNAVAILABLE,
    502: Exit.UNAVAILABLE,
    503: Exit.UNAVAILABLE,
    504: Exit.UNAVAILABLE,
}


def exit_for_http_status(status: int | None) -> Exit:
    """The exit code for an error answer; `None` means no answer at all (unreachable)."""
    if status is None:
        return Exit.UNAVAILABLE
    return _BY_HTTP_STATUS.get(status, Exit.ERROR)


def exit_for_final(request: dict[str, Any]) -> Exit:
    """The exit code for a final request (the JSON of GET /status or of the `final` event):
    Failed is 1, Cancelled is 10, Completed with failed images is 7, Completed with none
    is 0."""
    if request.get("status") == "Failed":
        return Exit.REQUEST_FAILED
    if request.get("status") == "Cancelled":
        return Exit.CANCELLED
    if request.get("progress", {}).get("images_failed", 0):
        return Exit.SOME_FAILED
    return Exit.OK
