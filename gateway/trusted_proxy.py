"""What the nearest proxy says about the caller, believed only from a trusted proxy.

A connection from an address in IMGPIPE_TRUSTED_PROXIES may say which scheme and host the
caller used (`X-Forwarded-Proto` and `X-Forwarded-Host`, or `Forwarded: proto=...;host=...`).
Proxies append to these headers, so the last value is the one the nearest proxy wrote; what a
caller sent ahead of it is never read. From any other peer the headers are ignored: a client
that connects directly cannot claim https, nor another host.

It decides the links the gateway hands out (gateway/urls.py), and through them whether the
caller came over https, for the session cookie and our origin (gateway/same_site.py).
"""

from __future__ import annotations

import ipaddress

from aiohttp import hdrs, web

from gateway.keys import SETTINGS


def forwarded_by_trusted_proxy(request: web.Request) -> tuple[str, str] | None:
    """The scheme (lower case) and host the nearest proxy wrote ('' for what it did not say),
    or None when the peer is not a trusted proxy."""
    if not _from_trusted_proxy(request, request.app[SETTINGS].trusted_proxies):
        return None
    return _forwarded(request)


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
