"""The links the gateway hands out (`Location`, `status_url`, `output_csv_url`).

They are never built from the connection's scheme: behind a TLS ingress that is http, and a
client following an http:// link would send its bearer key in clear. In order:

1. IMGPIPE_PUBLIC_API_URL, when set: the gateway as callers reach it.
2. A connection from a trusted proxy (IMGPIPE_TRUSTED_PROXIES) that says which scheme the
   caller used (`X-Forwarded-Proto` or `Forwarded: proto=`): that scheme, on the host the
   proxy forwarded (`X-Forwarded-Host`, `Forwarded: host=`) or else the Host header. Proxies
   append to these headers, so the last value is the one the nearest proxy wrote; what a
   caller sent ahead of it is never read.
3. Otherwise a path (`/status/ID`): a client resolves it against the URL it called, so it
   keeps the scheme the client chose.
"""

from __future__ import annotations

import ipaddress
import re

from aiohttp import hdrs, web

from gateway.backends import SETTINGS

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
    if not _from_trusted_proxy(request, settings.trusted_proxies):
        return ""
    proto, host = _forwarded(request)
    host = host or request.headers.get(hdrs.HOST, "")
    if proto not in _SCHEMES or not _HOST.fullmatch(host):
        return ""
    return f"{proto}://{host}"


def _from_trusted_proxy(
    request: web.Request, trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    if not trusted or request.remote is None:
        return False
    try:
        peer = ipaddress.ip_address(request.remote)
    except ValueError:  # a Unix socket
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    return any(peer.version == network.version and peer in network for network in trusted)


def _forwarded(request: web.Request) -> tuple[str, str]:
    """The scheme and host the nearest proxy wrote ('' for what it did not say)."""
    proto = _last(request.headers.getall(hdrs.X_FORWARDED_PROTO, ()))
    host = _last(request.headers.getall(hdrs.X_FORWARDED_HOST, ()))
    if request.forwarded:
        nearest = request.forwarded[-1]
        proto = nearest.get("proto", proto)
        host = nearest.get("host", host)
    return proto.strip().lower(), host.strip()


def _last(values: tuple[str, ...] | list[str]) -> str:
    """The last comma-separated value over every copy of a header."""
    return ",".join(values).rpartition(",")[2] if values else ""
