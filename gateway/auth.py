"""API keys at the gateway: who may call which route, and the key forwarded to gRPC.

- `auth_middleware` lets public routes through (`PUBLIC_ROUTES`) and, when IMGPIPE_API_KEYS is
  set, answers 401 with `WWW-Authenticate: Bearer realm="imgpipe"` to any other call without a
  valid key. The key comes from `Authorization: Bearer <key>`, or for browsers from the
  `imgpipe_key` cookie that `POST /session` sets (HttpOnly, SameSite=Strict).
- `forwarding_interceptors()` go on the gateway's gRPC channels: every call made while answering
  a request carries that request's key as `authorization: Bearer <key>` metadata. Ingest and
  status check it again, record and filter by its owner, and apply the rate limit. Handlers
  never pass the key themselves, so no route can forget to.

`/files/{key}` stays public: output URLs are handed to other systems (a shop's catalog fetches
the images), and every stored key contains the request's random UUID, which is what protects
them, as with any capability URL.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

import grpc
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

from services.common.auth import MAX_KEY_LENGTH, KeyRing, bearer_token
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.grpc_client import rewriting_interceptors

log = logging.getLogger(__name__)

COOKIE = "imgpipe_key"
API_KEYS = web.AppKey("api_keys", KeyRing)
# Routes (as registered) that answer without a key: probes, the contract, the web page and its
# sign-in, and stored files (see above).
PUBLIC_ROUTES = frozenset(
    {
        "/",
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/docs",
        "/session",
        "/session/logout",
        "/files/{key}",
    }
)
PUBLIC_PREFIXES = ("/static/",)
_MAX_NEXT = 2048

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The key of the HTTP request being answered, for the gRPC calls made while answering it.
_forwarded_key: ContextVar[str | None] = ContextVar("imgpipe_forwarded_key", default=None)


def presented_key(request: web.Request) -> str | None:
    """The key the caller sent: the Authorization header first, then the browser's cookie.

    Anything that cannot be a key (not `Bearer <token>`, not printable ASCII, too long) is ''
    (a wrong key): it is never forwarded, since gRPC metadata must be printable ASCII.
    """
    header = request.headers.get(hdrs.AUTHORIZATION)
    key = bearer_token(header) if header is not None else request.cookies.get(COOKIE)
    if header is None and not key:
        return None
    if not key or len(key) > MAX_KEY_LENGTH or not (key.isascii() and key.isprintable()):
        return ""
    return key


def is_public(request: web.Request) -> bool:
    if request.match_info.http_exception is not None:
        return True  # no such route (404) or method (405): answered as such, key or not
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else request.path
    return canonical in PUBLIC_ROUTES or canonical.startswith(PUBLIC_PREFIXES)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 unless the route is public or the caller has a valid key (when keys are set)."""
    key = presented_key(request)
    keys = request.app[API_KEYS]
    if keys.enabled and not is_public(request):
        refusal = None
        if key is None:
            refusal = Unauthenticated(
                "an API key is required: send the header Authorization: Bearer <key>"
            )
        elif keys.authenticate(key) is None:
            refusal = Unauthenticated("the API key is not valid", key_given=True)
        if refusal is not None:
            if request.path.startswith("/ui/"):
                # The pages for browsers without JavaScript get the key form, not JSON.
                from gateway.web import key_response  # web imports handlers: import late

                response = key_response(request, refusal.http_status)
                response.headers.update(refusal.http_headers())
                return response
            raise refusal
    token = _forwarded_key.set(key or None)
    try:
        return await handler(request)
    finally:
        _forwarded_key.reset(token)


# ---------------------------------------------------------------- browser sign-in


async def sign_in(request: web.Request) -> web.Response:
    """POST /session, form field `key` (and optional `next`): check the key, keep it in an
    HttpOnly, SameSite=Strict cookie, and go back to `next` (a local path) or `/`."""
    _refuse_cross_site(request)
    form = await _form(request)
    key = str(form.get("key", "")).strip()
    response = _see_other(str(form.get("next", "")))
    keys = request.app[API_KEYS]
    if not keys.enabled:
        return response  # nothing to sign in to: every route answers without a key
    if not key:
        raise Unauthenticated("the form field `key` is required: the API key to sign in with")
    if keys.authenticate(key) is None:
        raise Unauthenticated("the API key is not valid", key_given=True)
    response.set_cookie(COOKIE, key, path="/", **_cookie_attributes(request))
    return response


async def sign_out(request: web.Request) -> web.Response:
    """POST /session/logout: forget the cookie, then go to `next` or `/`."""
    _refuse_cross_site(request)
    form = await _form(request)
    response = _see_other(str(form.get("next", "")))
    response.del_cookie(COOKIE, path="/", **_cookie_attributes(request))
    return response


async def _form(request: web.Request) -> MultiDictProxy[Any]:
    """The posted form (urlencoded or multipart); empty for any other body."""
    try:
        return await request.post()
    except (ValueError, AssertionError, HttpProcessingError):
        raise InvalidArgument("malformed form body") from None


def _cookie_attributes(request: web.Request) -> dict[str, Any]:
    # Secure whenever the caller came over TLS, also through a proxy that terminated it.
    https = request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
    return {"httponly": True, "samesite": "Strict", "secure": True if https else None}


def _refuse_cross_site(request: web.Request) -> None:
    # SameSite=Strict keeps the cookie off cross-site requests; this keeps another site from
    # signing a browser in with the other site's key (login CSRF) or out.
    origin = request.headers.get(hdrs.ORIGIN)
    if origin and origin != "null" and urlsplit(origin).netloc != request.host:
        raise web.HTTPForbidden(reason="sign-in from another site is refused")
    if origin == "null":
        raise web.HTTPForbidden(reason="sign-in from an opaque origin is refused")


def safe_next(raw: str) -> str:
    """`raw` if it is a path on this site, else `/`: never a redirect to another host."""
    if (
        not raw.startswith("/")
        or raw.startswith(("//", "/\\"))
        or "\\" in raw
        or len(raw) > _MAX_NEXT
        or any(ord(char) < 0x20 or ord(char) == 0x7F for char in raw)
    ):
        return "/"
    return raw


def _see_other(raw_next: str) -> web.Response:
    return web.Response(
        status=303, headers={hdrs.LOCATION: safe_next(raw_next), "Cache-Control": "no-store"}
    )


# ---------------------------------------------------------------- forwarding to gRPC


def _with_key(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    key = _forwarded_key.get()
    if key is None:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add("authorization", f"Bearer {key}")
    return details._replace(metadata=metadata)  # type: ignore[attr-defined]


def forwarding_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add the caller's key to every gRPC call of the gateway."""
    return rewriting_interceptors(_with_key)
