"""What an HTTP caller presents as its credential: an API key or the session cookie.

The cookie holds an opaque session id, never the key (services/common/sessions.py): made by
the status service with the key at sign-in (gateway/sign_in.py), checked there. It is named
`__Host-imgpipe_session` when the caller came over https (so Secure, Path=/, no Domain, by the
browser's rule), else `imgpipe_session`.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import hdrs, web

from services.common.auth import MAX_KEY_LENGTH, bearer_token
from services.common.session_ids import is_session_id

COOKIE = "imgpipe_session"
SECURE_COOKIE = "__Host-" + COOKIE  # over https: Secure, Path=/, no Domain, by the browser's rule
LEGACY_COOKIE = "imgpipe_key"  # held the key itself; cleared at sign-in and sign-out


@dataclass(frozen=True, slots=True)
class Credential:
    """What the caller presented: a key (header) or a session id (cookie). An empty token is
    something that cannot be either: a wrong credential, never forwarded."""

    scheme: str  # "Bearer" or "Session"
    token: str

    @property
    def from_cookie(self) -> bool:
        return self.scheme == "Session"

    @property
    def metadata(self) -> str | None:
        return f"{self.scheme} {self.token}" if self.token else None


def presented(request: web.Request) -> Credential | None:
    """The Authorization header's key first, then the browser's session cookie.

    Anything that cannot be a key (not `Bearer <token>`, not printable ASCII, too long) or a
    session id has an empty token: gRPC metadata must be printable ASCII.
    """
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is not None:
        key = bearer_token(header) or ""
        if len(key) > MAX_KEY_LENGTH or not (key.isascii() and key.isprintable()):
            key = ""
        return Credential("Bearer", key)
    cookie = request.cookies.get(SECURE_COOKIE) or request.cookies.get(COOKIE)
    if cookie is None:
        return None
    return Credential("Session", cookie if is_session_id(cookie) else "")
