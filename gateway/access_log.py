"""The gateway's access log: one line per request, with no query string values.

aiohttp's own access log writes the whole request line, query included, and the Referer: a
`webhook_url` given in the query carries the receiver's token, and other values may be
secrets too. Here the query keeps only its parameter names (`?webhook_url&page_size`), names
that do not look like one of ours are shown as `_`, and the Referer loses its query and
fragment.
"""

from __future__ import annotations

import logging
import re

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.log import access_logger
from yarl import URL

# An API parameter name; anything else in a name's place may be a value sent without '='.
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MAX_NAMES = 20


def redacted_target(request: web.BaseRequest) -> str:
    """The request's path, with its query reduced to the parameter names."""
    path = request.path
    if not request.query_string:
        return path
    names = [name if _NAME.fullmatch(name) else "_" for name in request.query]
    more = len(names) - _MAX_NAMES
    shown = names[:_MAX_NAMES] + ([f"+{more}"] if more > 0 else [])
    return f"{path}?{'&'.join(shown)}"


def redacted_referer(value: str | None) -> str:
    """scheme://host/path of a Referer: its query and fragment may hold secrets."""
    if not value:
        return "-"
    try:
        return str(URL(value).with_query(None).with_fragment(None).with_user(None))
    except (ValueError, TypeError):
        return "-"


class AccessLogger(AbstractAccessLogger):
    """aiohttp's `access_log_class` for the gateway (gateway/serving.py)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        write(self.logger, request, response.status, response.body_length, time)


def log_client_gone(request: web.BaseRequest, seconds: float) -> None:
    """The line of a request whose handler was cancelled, which aiohttp does not write: its
    client went away (gateway/serving.py), or a shutdown's grace period ran out. 499, as
    nginx logs a client that left."""
    write(access_logger, request, 499, 0, seconds)


def write(
    logger: logging.Logger, request: web.BaseRequest, status: int, size: int, seconds: float
) -> None:
    target = redacted_target(request)
    version = f"{request.version.major}.{request.version.minor}"
    logger.info(
        '%s "%s %s HTTP/%s" %d %d',
        request.remote or "-",
        request.method,
        target,
        version,
        status,
        size,
        extra={
            "remote_address": request.remote or "-",
            "method": request.method,
            "target": target,
            "status": status,
            "bytes": size,
            "seconds": round(seconds, 4),
            "referer": redacted_referer(request.headers.get(hdrs.REFERER)),
            "user_agent": request.headers.get(hdrs.USER_AGENT, "-")[:200],
        },
    )
