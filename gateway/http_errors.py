"""HTTP error handling of the gateway: every failure becomes the JSON error of docs/architecture.md.

The mapping from gRPC status to imgpipe errors lives in `services.common.errors`; this module
only adds the errors that exist at the HTTP layer alone (routing, methods, media types) and the
middleware that renders every exception as `{"error": {"code", "message", "details"}}`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import hdrs, web
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict

from services.common.errors import ImgpipeError, error_body, error_from_rpc

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UnsupportedMediaType(ImgpipeError):
    code = "unsupported_media_type"
    http_status = 415


class BodyTimeout(ImgpipeError):
    """The request body stopped arriving. The connection is closed: the rest of the body, if
    it ever comes, is not worth waiting for."""

    code = "request_timeout"
    http_status = 408

    def http_headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class ClientClosedRequest(ImgpipeError):
    """The client closed its connection before its answer, which nobody will read. 499 is
    nginx's convention: the access log and the metrics count it as the caller's doing, not as a
    failure of the gateway."""

    code = "client_closed_request"
    http_status = 499


# Error codes for the HTTP statuses aiohttp raises itself (unknown route, wrong method, ...).
_CODE_FOR_STATUS = {
    400: "invalid_argument",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}
# Headers of an aiohttp HTTPException that still mean something on the JSON answer.
_KEPT_HEADERS = (hdrs.ALLOW, hdrs.RETRY_AFTER, hdrs.WWW_AUTHENTICATE)


def error_response(
    error: ImgpipeError, *, status: int | None = None, headers: LooseHeaders | None = None
) -> web.Response:
    # The error's own headers: WWW-Authenticate on a 401, Retry-After on a 429.
    merged = CIMultiDict(error.http_headers())
    if headers:
        merged.update(headers)
    return web.json_response(error_body(error), status=status or error.http_status, headers=merged)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 404:
        message = f"{request.path} was not found"
    elif exc.status == 405:
        message = f"{request.method} is not allowed on {request.path}"
    else:
        message = exc.reason or "error"
    error = ImgpipeError(message)
    error.code = _CODE_FOR_STATUS.get(exc.status, "internal" if exc.status >= 500 else "error")
    kept = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
    return error_response(error, status=exc.status, headers=kept)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every failure with the JSON error body; never let a stack trace reach a caller."""
    try:
        return await handler(request)
    except ImgpipeError as exc:
        if exc.http_status >= 500:
            log.warning("request failed: %s", exc, extra={"path": request.path, "code": exc.code})
        return error_response(exc)
    except grpc.aio.AioRpcError as exc:
        error = error_from_rpc(exc)
        if error.http_status >= 500:
            # The gRPC details may name internal addresses: log them, do not return them.
            log.warning(
                "backend call failed: %s",
                exc.details(),
                extra={"path": request.path, "grpc_code": exc.code().name},
            )
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and other non-errors pass through untouched
            raise
        return _from_http_exception(request, exc)
    except ConnectionResetError:
        # The caller went away: an upload it stopped sending, a download or a stream it
        # stopped reading. Not a failure of ours, and worth no traceback.
        log.info("the client closed the connection", extra={"path": request.path})
        return error_response(ClientClosedRequest("the client closed the connection"))
    except Exception:
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        return error_response(ImgpipeError("internal error"))
