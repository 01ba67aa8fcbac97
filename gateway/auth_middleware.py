"""Who may call which route at the gateway: the HTTP auth middleware.

- `auth_middleware` lets public routes through (`PUBLIC_ROUTES`) and, when IMGPIPE_API_KEYS is
  set, answers 401 with `WWW-Authenticate: Bearer realm="imgpipe"` to any other call without a
  valid credential (gateway/http_credentials.py): an API key in `Authorization: Bearer <key>`,
  or for browsers the session cookie that `POST /session` sets (gateway/sign_in.py), checked
  by the status service (gateway/session_client.py).
- A write (any method but GET, HEAD, OPTIONS) authenticated by the cookie must show that it
  comes from this site (gateway/same_site.py): `Sec-Fetch-Site: same-origin` or an `Origin`
  equal to ours. Otherwise it is 403: SameSite does not stop sites on another port or a
  sibling subdomain. Calls with a bearer key are not affected: no browser adds that header by
  itself.
- Every gRPC call made while answering the request carries its credential
  (gateway/grpc_credentials.py).
- A refusal of a /ui/ route is rendered by the `PAGE_REFUSAL` the application was given, so
  this module imports no pages.

`/files/{key}` stays public: output URLs are handed to other systems (a shop's catalog fetches
the images), and every stored key contains the request's random UUID, which is what protects
them, as with any capability URL.
"""

from __future__ import annotations

from aiohttp import web

from gateway.grpc_credentials import forwarding
from gateway.http_credentials import Credential, presented
from gateway.http_errors import Handler
from gateway.keys import API_KEYS, PAGE_REFUSAL, SESSIONS
from gateway.same_site import cross_site, same_origin
from services.common.errors import ImgpipeError, PermissionDenied, Unauthenticated

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
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
    with forwarding(credential.metadata if credential is not None else None):
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


async def _admit(request: web.Request, credential: Credential | None) -> None:
    if (
        credential is not None
        and credential.from_cookie
        and request.method not in SAFE_METHODS
        and (cross_site(request) or not same_origin(request))
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
