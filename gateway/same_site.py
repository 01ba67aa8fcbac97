"""Whether a browser's request comes from this site, and whether its caller used https.

A write authenticated by the session cookie must show that it comes from this site
(gateway/auth_middleware.py), and signing in or out must not come from another one
(gateway/sign_in.py): SameSite=Strict does not stop sites on another port or a sibling
subdomain. Both compare the browser's `Origin` with ours.

Our scheme, which also decides the `__Host-` cookie and its Secure flag, is https when the
connection is TLS, or when the links the gateway hands out say https (gateway/urls.py):
IMGPIPE_PUBLIC_API_URL is https, or a trusted proxy (IMGPIPE_TRUSTED_PROXIES) says the caller
used https. `X-Forwarded-Proto` from any other peer is ignored: a client that connects
directly cannot claim https.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from gateway.urls import public_scheme


def came_over_https(request: web.Request) -> bool:
    """TLS to us, or https by the same rules as our links; never by the caller's word alone."""
    return request.secure or public_scheme(request) == "https"


def own_origin(request: web.Request) -> str:
    return f"{'https' if came_over_https(request) else request.scheme}://{request.host}"


def same_origin(request: web.Request) -> bool:
    """The browser says the request comes from a page of this site."""
    return request.headers.get("Sec-Fetch-Site") == "same-origin" or request.headers.get(
        hdrs.ORIGIN
    ) == own_origin(request)


def cross_site(request: web.Request) -> bool:
    """The browser says the request comes from another origin (or an opaque one: `null`)."""
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get(hdrs.ORIGIN)
    return (site is not None and site not in ("same-origin", "none")) or (
        origin is not None and origin != own_origin(request)
    )
