"""Page tokens of ListProducts and GET /status (a CSV row), and of ListRequests and
GET /requests (a request's created_at and id): the position after which the next page starts.

A token is `v1:<row>` in urlsafe base64 without padding, and each position has exactly one
spelling: decoding re-encodes and compares, so `v1:007`, a padded token or one with stray
characters is refused instead of naming the same page a second way. The gateway keeps rendered
pages keyed on the decoded position (gateway/product_page_cache.py), and one spelling per
position is what keeps a caller from filling that cache with copies of one page.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime, timedelta

from services.common.errors import Detail, InvalidArgument

VERSION = "v1"
MAX_ROW = 2**31 - 1  # row numbers are Postgres integers
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_page_token(after_row: int) -> str:
    """The token of the page after CSV row `after_row` (at least 1)."""
    return base64.urlsafe_b64encode(f"{VERSION}:{after_row}".encode()).decode().rstrip("=")


def decode_page_token(token: str) -> int:
    """The row a token's page starts after: 0 for '' (the first page); InvalidArgument naming
    `page_token` for anything `encode_page_token` does not produce."""
    if not token:
        return 0
    after = _row_of(token)
    if after is None or not 1 <= after <= MAX_ROW or encode_page_token(after) != token:
        raise InvalidArgument(
            "page_token is not valid: give next_page_token exactly as it was returned",
            [Detail("not a token from this API", "page_token")],
        )
    return after


def _row_of(token: str) -> int | None:
    if len(token) > 32 or not token.isascii():
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (ValueError, binascii.Error):
        return None
    version, _, after = text.partition(":")
    if version != VERSION or not (after.isascii() and after.isdigit()) or len(after) > 10:
        return None
    return int(after)


def encode_request_token(created_at: datetime, request_id: uuid.UUID) -> str:
    """The token of the page of requests after (created_at, request_id), newest first."""
    micros = _micros(created_at)
    return base64.urlsafe_b64encode(f"r1:{micros}:{request_id.hex}".encode()).decode().rstrip("=")


def decode_request_token(token: str) -> tuple[datetime, uuid.UUID] | None:
    """The keyset position a token of ListRequests names: None for '' (the first page);
    InvalidArgument naming `page_token` for anything `encode_request_token` does not produce."""
    if not token:
        return None
    position = _request_position(token)
    if position is None or encode_request_token(*position) != token:
        raise InvalidArgument(
            "page_token is not valid: give next_page_token exactly as it was returned",
            [Detail("not a token from this API", "page_token")],
        )
    return position


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _request_position(token: str) -> tuple[datetime, uuid.UUID] | None:
    if len(token) > 80 or not token.isascii():
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        version, micros, hex_id = text.split(":")
        if version != "r1" or not (micros.isdigit() and len(micros) <= 18):
            return None
        return _EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(hex=hex_id)
    except (ValueError, binascii.Error, OverflowError):
        return None
