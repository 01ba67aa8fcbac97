"""Every link the gateway builds: `Location`, `status_url`, `output_csv_url`, the HTML routes.

Absolute links are never built from the connection's scheme: behind a TLS ingress that is
http, and a client following an http:// link would send its bearer key in clear. In order:

1. IMGPIPE_PUBLIC_API_URL, when set: the gateway as callers reach it.
2. A connection from a trusted proxy (IMGPIPE_TRUSTED_PROXIES, gateway/trusted_proxy.py) that
   says which scheme the caller used: that scheme, on the host the proxy forwarded or else the
   Host header.
3. Otherwise a path (`/status/ID`): a client resolves it against the URL it called, so it
   keeps the scheme the client chose.

The HTML routes' links (`request_path`, `cancel_path`) are always paths.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlsplit

from aiohttp import hdrs, web

from gateway.json_views import is_final
from gateway.keys import SETTINGS
from gateway.trusted_proxy import forwarded_by_trusted_proxy
from services.common.pb.imgpipe.v1 import request_pb2

_SCHEMES = ("http", "https")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?")


def public_url(request: web.Request, path: str) -> str:
    """`path` (starting with /) as a link for the caller: absolute when the gateway knows
    how it is reached, else the path alone."""
    return public_base(request) + path


def public_base(request: web.Request) -> str:
    """scheme://host of the gateway as the caller reached it, or '' when not known."""
    settings = request.app[SETTINGS]
    if settings.public_api_url:
        return settings.public_api_url
    forwarded = forwarded_by_trusted_proxy(request)
    if forwarded is None:
        return ""
    proto, host = forwarded
    host = host or request.headers.get(hdrs.HOST, "")
    if proto not in _SCHEMES or not _HOST.fullmatch(host):
        return ""
    return f"{proto}://{host}"


def public_scheme(request: web.Request) -> str:
    """'https' or 'http' as callers reach the gateway, by the rules above; '' when not known."""
    return urlsplit(public_base(request)).scheme


def status_url(request: web.Request, request_id: str) -> str:
    return public_url(request, f"/status/{quote(request_id, safe='')}")


def output_csv_url(request: web.Request, request_id: str) -> str:
    return public_url(request, f"/requests/{quote(request_id, safe='')}/output.csv")


def output_csv_link(request: web.Request, found: request_pb2.Request) -> str | None:
    """Where the request's output CSV is, once it is final and has one; else None."""
    if is_final(found) and found.output_csv_key:
        return output_csv_url(request, found.request_id)
    return None


def request_path(request_id: str) -> str:
    """The HTML status page of a request."""
    return f"/ui/requests/{quote(request_id, safe='')}"


def cancel_path(request_id: object) -> str:
    """Where the HTML status page's Cancel button posts."""
    return f"/ui/requests/{quote(str(request_id), safe='')}/cancel"
