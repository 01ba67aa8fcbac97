"""Browser sign-in: `POST /session` and `POST /session/logout`.

Signing in checks the API key, has the status service start a session with it
(gateway/session_client.py), and keeps the session's opaque id, never the key, in an HttpOnly,
SameSite=Strict cookie, `__Host-` prefixed (so Secure, Path=/, no Domain) when the caller came
over https (gateway/same_site.py). Signing out ends the session for every replica and forgets
the cookie. Neither may come from another site (login CSRF), and both go back to `next` only
when it is a path on this site.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

from gateway.http_credentials import COOKIE, LEGACY_COOKIE, SECURE_COOKIE, presented
from gateway.keys import API_KEYS, SESSIONS
from gateway.same_site import came_over_https, cross_site
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated

_MAX_NEXT = 2048


async def sign_in(request: web.Request) -> web.Response:
    """POST /session, form field `key` (and optional `next`): check the key, start a session
    with it, keep the session's id in the cookie, and go back to `next` (a local path) or `/`."""
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
    made = await request.app[SESSIONS].create(key)
    max_age = max(0, made.expires_at.seconds - int(time.time()))
    response.set_cookie(
        _cookie_name(request),
        made.session_id,
        path="/",
        max_age=max_age,
        **_cookie_attributes(request),
    )
    response.del_cookie(LEGACY_COOKIE, path="/")
    return response


async def sign_out(request: web.Request) -> web.Response:
    """POST /session/logout: end the session (for every replica), forget the cookie, then go
    to `next` or `/`."""
    _refuse_cross_site(request)
    form = await _form(request)
    response = _see_other(str(form.get("next", "")))
    credential = presented(request)
    if (
        credential is not None
        and credential.from_cookie
        and credential.token
        and request.app[API_KEYS].enabled
    ):
        await request.app[SESSIONS].revoke(credential)
    for name in (SECURE_COOKIE, COOKIE, LEGACY_COOKIE):
        if name in request.cookies:
            response.del_cookie(name, path="/", **_cookie_attributes(request))
    return response


async def _form(request: web.Request) -> MultiDictProxy[Any]:
    """The posted form (urlencoded or multipart); empty for any other body."""
    try:
        return await request.post()
    except (ValueError, AssertionError, HttpProcessingError):
        raise InvalidArgument("malformed form body") from None


def _cookie_name(request: web.Request) -> str:
    return SECURE_COOKIE if came_over_https(request) else COOKIE


def _cookie_attributes(request: web.Request) -> dict[str, Any]:
    secure = True if came_over_https(request) else None
    return {"httponly": True, "samesite": "Strict", "secure": secure}


def _refuse_cross_site(request: web.Request) -> None:
    # SameSite=Strict keeps the cookie off cross-site requests; this keeps another site from
    # signing a browser in with the other site's key (login CSRF) or out.
    if cross_site(request):
        raise PermissionDenied("signing in or out from another site is refused")


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
