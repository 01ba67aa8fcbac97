"""Who may call which route at the gateway, from which site, and the credential forwarded to gRPC.

- `auth_middleware` lets public routes through (`PUBLIC_ROUTES`) and, when IMGPIPE_API_KEYS is
  set, answers 401 with `WWW-Authenticate: Bearer realm="imgpipe"` to any other call without a
  valid credential: an API key in `Authorization: Bearer <key>`, or for browsers the session
  cookie that `POST /session` sets.
- The cookie holds an opaque session id, never the key (services/common/sessions.py): made by
  the status service with the key, checked there (and remembered here for a few seconds),
  ended by `POST /session/logout` or when it expires. It is HttpOnly, SameSite=Strict, and
  `__Host-` prefixed (so Secure, Path=/, no Domain) when the caller came over https.
- A write (any method but GET, HEAD, OPTIONS) authenticated by the cookie must show that it
  comes from this site: `Sec-Fetch-Site: same-origin` or an `Origin` equal to ours. Otherwise it
  is 403: SameSite does not stop sites on another port or a sibling subdomain. Calls with a
  bearer key are not affected: no browser adds that header by itself.
- `forwarding_interceptors()` go on the gateway's gRPC channels: every call made while answering
  a request carries that request's credential as `authorization` metadata (`Bearer <key>` or
  `Session <id>`). Ingest and status check it again, record and filter by its owner, and apply
  the limits. Handlers never pass it themselves, so no route can forget to.

`/files/{key}` stays public: output URLs are handed to other systems (a shop's catalog fetches
the images), and every stored key contains the request's random UUID, which is what protects
them, as with any capability URL.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiDictProxy

from services.common.auth import MAX_KEY_LENGTH, KeyRing, bearer_token
from services.common.errors import (
    ImgpipeError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    error_from_rpc,
)
from services.common.grpc_client import rewriting_interceptors
from services.common.pb.imgpipe.v1 import session_service_pb2 as session_pb
from services.common.pb.imgpipe.v1 import session_service_pb2_grpc as session_grpc
from services.common.session_ids import CACHE_SECONDS, is_session_id, session_hash

log = logging.getLogger(__name__)

COOKIE = "imgpipe_session"
SECURE_COOKIE = "__Host-" + COOKIE  # over https: Secure, Path=/, no Domain, by the browser's rule
LEGACY_COOKIE = "imgpipe_key"  # held the key itself; cleared at sign-in and sign-out
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
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
_SESSIONS_REMEMBERED = 4096

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Renders a refusal of a /ui/ route as a page (gateway/web.py), so this module imports no pages.
PageRefusal = Callable[[web.Request, ImgpipeError], web.Response]
PAGE_REFUSAL: web.AppKey[PageRefusal] = web.AppKey("page_refusal")

# The `authorization` value of the HTTP request being answered, for the gRPC calls made while
# answering it.
_forwarded: ContextVar[str | None] = ContextVar("imgpipe_forwarded_credential", default=None)


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


def is_public(request: web.Request) -> bool:
    if request.match_info.http_exception is not None:
        return True  # no such route (404) or method (405): answered as such, key or not
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else request.path
    return canonical in PUBLIC_ROUTES or canonical.startswith(PUBLIC_PREFIXES)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """403 for a cookie's write from another site; 401 unless the route is public or the
    caller has a valid credential (when keys are set)."""
    credential = presented(request)
    token = _forwarded.set(credential.metadata if credential is not None else None)
    try:
        if not is_public(request):
            try:
                await _admit(request, credential)
            except ImgpipeError as refusal:
                if not request.path.startswith("/ui/"):
                    raise
                # The pages for browsers without JavaScript get a page, not JSON.
                response = request.app[PAGE_REFUSAL](request, refusal)
                response.headers.update(refusal.http_headers())
                return response
        return await handler(request)
    finally:
        _forwarded.reset(token)


async def _admit(request: web.Request, credential: Credential | None) -> None:
    if (
        credential is not None
        and credential.from_cookie
        and request.method not in SAFE_METHODS
        and (_cross_site(request) or not _same_origin(request))
    ):
        raise PermissionDenied(
            "a write with the session cookie must come from this site: send"
            " `Origin` (browsers do), or use `Authorization: Bearer <key>`"
        )
    keys = request.app[API_KEYS]
    if not keys.enabled:
        return
    if credential is None:
        raise Unauthenticated("an API key is required: send the header Authorization: Bearer <key>")
    if credential.from_cookie:
        if not credential.token or not await request.app[SESSIONS].is_live(credential):
            raise Unauthenticated("the session has ended: sign in again", key_given=True)
    elif keys.authenticate(credential.token) is None:
        raise Unauthenticated("the API key is not valid", key_given=True)


# ---------------------------------------------------------------- sessions


class Sessions:
    """The status service's SessionService, and which session ids it said were live lately.

    Only live answers are remembered, for CACHE_SECONDS: the services check every call again,
    so this only spares them a call per request; a sign-out takes effect within that time.
    """

    def __init__(self, rpc_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpc_timeout = rpc_timeout
        self._stub: session_grpc.SessionServiceAsyncStub | None = None
        self._clock = clock
        self._live: OrderedDict[bytes, float] = OrderedDict()

    def connect(self, stub: session_grpc.SessionServiceAsyncStub) -> None:
        self._stub = stub

    @property
    def stub(self) -> session_grpc.SessionServiceAsyncStub:
        if self._stub is None:
            raise RuntimeError("the gateway's backends are not open")
        return self._stub

    async def create(self, key: str) -> session_pb.CreateSessionResponse:
        """A new session for `key` (already checked against the key ring)."""
        token = _forwarded.set(f"Bearer {key}")
        try:
            return await self.stub.CreateSession(
                session_pb.CreateSessionRequest(), timeout=self.rpc_timeout
            )
        finally:
            _forwarded.reset(token)

    async def revoke(self, credential: Credential) -> None:
        """End the session, here at once and everywhere within CACHE_SECONDS; one that has
        ended already is no error."""
        self._live.pop(session_hash(credential.token), None)
        token = _forwarded.set(credential.metadata)
        try:
            await self.stub.RevokeSession(
                session_pb.RevokeSessionRequest(), timeout=self.rpc_timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
        finally:
            _forwarded.reset(token)

    async def is_live(self, credential: Credential) -> bool:
        """Whether the session is live (the gRPC call carries it as the forwarded credential)."""
        digest = session_hash(credential.token)
        until = self._live.get(digest)
        if until is not None and until > self._clock():
            return True
        try:
            await self.stub.GetSession(
                session_pb.GetSessionRequest(), timeout=min(5.0, self.rpc_timeout)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._live.pop(digest, None)
                return False
            raise error_from_rpc(exc) from None  # a page for /ui/ routes, JSON elsewhere
        self._live[digest] = self._clock() + CACHE_SECONDS
        self._live.move_to_end(digest)
        while len(self._live) > _SESSIONS_REMEMBERED:
            self._live.popitem(last=False)
        return True


SESSIONS = web.AppKey("sessions", Sessions)


# ---------------------------------------------------------------- browser sign-in


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


def _https(request: web.Request) -> bool:
    # Also through a proxy that terminated TLS.
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def _cookie_name(request: web.Request) -> str:
    return SECURE_COOKIE if _https(request) else COOKIE


def _cookie_attributes(request: web.Request) -> dict[str, Any]:
    return {"httponly": True, "samesite": "Strict", "secure": True if _https(request) else None}


def _own_origin(request: web.Request) -> str:
    return f"{'https' if _https(request) else request.scheme}://{request.host}"


def _same_origin(request: web.Request) -> bool:
    """The browser says the request comes from a page of this site."""
    return request.headers.get("Sec-Fetch-Site") == "same-origin" or request.headers.get(
        hdrs.ORIGIN
    ) == _own_origin(request)


def _cross_site(request: web.Request) -> bool:
    """The browser says the request comes from another origin (or an opaque one: `null`)."""
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get(hdrs.ORIGIN)
    return (site is not None and site not in ("same-origin", "none")) or (
        origin is not None and origin != _own_origin(request)
    )


def _refuse_cross_site(request: web.Request) -> None:
    # SameSite=Strict keeps the cookie off cross-site requests; this keeps another site from
    # signing a browser in with the other site's key (login CSRF) or out.
    if _cross_site(request):
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


# ---------------------------------------------------------------- forwarding to gRPC


def _with_credential(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    value = _forwarded.get()
    if value is None:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add("authorization", value)
    return details._replace(metadata=metadata)  # type: ignore[attr-defined]


def forwarding_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add the caller's credential to every gRPC call of the gateway."""
    return rewriting_interceptors(_with_credential)
