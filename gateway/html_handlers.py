"""The web page for merchants, and the HTML routes that make it work without JavaScript.

- `GET /` is `static/index.html`; `GET /static/{name}` its script, style sheet and icon. With
  JavaScript the page calls the JSON API (`POST /upload`, the SSE stream, `GET /status`).
- `POST /ui/upload` takes the page's plain HTML form (the same fields as `POST /upload`, which
  it streams to ingest the same way) and answers 303 See Other to the status page; a rejected
  CSV is an HTML page listing its problems by row and column. `POST /upload` stays the JSON API.
- `GET /ui/requests/{request_id}` is the status rendered on the server, reloading itself
  until the request is final, then its products, failed images and the output CSV link; while
  it runs, a Cancel button posts to `POST /ui/requests/{request_id}/cancel` (303 back).
- `GET /ui/requests` lists your requests, newest first (docs/lifecycle.md).

Every answer carries the security headers below. Thumbnails are the one thing loaded from
elsewhere: the "before" images are the merchant's own URLs from the CSV, and output images may
live on a storage host, so `img-src` allows http: and https:; `Referrer-Policy: no-referrer`
keeps request ids out of what those hosts see.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import grpc
from aiohttp import web

from gateway import html_pages, json_views
from gateway.keys import CHANNELS, SETTINGS
from gateway.upload import upload_csv
from gateway.urls import output_csv_link, request_path
from services.common.errors import ImgpipeError, NotFound, error_from_rpc
from services.common.page_token import decode_page_token
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
INDEX = STATIC / "index.html"
# The only files under /static/, with their media types: nothing else in the folder is served.
ASSETS = {
    "app.js": "text/javascript",
    "app.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
PAGE_SIZE = 100
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        # Thumbnails: outputs from this gateway or a storage host, inputs from the merchant's.
        "img-src 'self' http: https:",
        # fetch() of the JSON API and the EventSource of live progress.
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Answers an HTML route renders itself; anything else goes to the JSON error middleware.
_HTML_ERROR_STATUSES = frozenset({400, 401, 403, 404, 408, 409, 413, 415, 503})


@functools.cache
def _read(path: Path) -> bytes:
    # Small files that change only with a release: read on first use, then kept.
    return path.read_bytes()


def html_response(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
    )


async def index(request: web.Request) -> web.Response:
    """The web page: upload a CSV, follow its progress, see the results."""
    return web.Response(
        body=_read(INDEX),
        content_type="text/html",
        charset="utf-8",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


async def asset(request: web.Request) -> web.Response:
    """One of the page's files; revalidated on each use, so a release shows at once."""
    name = request.match_info["name"]
    if name not in ASSETS:
        raise NotFound("no such file")
    return web.Response(
        body=_read(STATIC / name),
        content_type=ASSETS[name],
        charset="utf-8" if ASSETS[name].startswith("text/") else None,
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


async def upload_form(request: web.Request) -> web.Response:
    """The page's form without JavaScript: 303 to the status page, or the problems as HTML."""
    try:
        accepted = await upload_csv(request, request.app[CHANNELS].ingest, request.app[SETTINGS])
    except (ImgpipeError, grpc.aio.AioRpcError) as exc:
        return html_error_response(request, exc)
    return web.Response(
        status=303,
        headers={**SECURITY_HEADERS, "Location": request_path(accepted.request_id)},
    )


async def request_page(request: web.Request) -> web.Response:
    """The status of a request as HTML; the products once it is final, a page at a time."""
    request_id = request.match_info["request_id"].strip()
    page_token = request.query.get("page_token", "")
    channels, timeout = request.app[CHANNELS], request.app[SETTINGS].rpc_timeout
    try:
        if not request_id:
            raise NotFound("no request has this id")
        decode_page_token(page_token)  # refused at once, also while no products are shown
        got = await channels.status.GetRequest(
            status_pb.GetRequestRequest(request_id=request_id), timeout=timeout
        )
        found = got.request
        final = json_views.is_final(found)
        summary = json_views.request_json(found, output_csv_link(request, found))
        products: list[dict[str, object]] = []
        next_token = None
        if final:
            # Products are shown once final: an unfinished page reloads every few seconds.
            page = await channels.status.ListProducts(
                status_pb.ListProductsRequest(
                    request_id=found.request_id, page_size=PAGE_SIZE, page_token=page_token
                ),
                timeout=timeout,
            )
            products = [json_views.product_json(product) for product in page.products]
            next_token = page.next_page_token or None
    except (ImgpipeError, grpc.aio.AioRpcError) as exc:
        return html_error_response(request, exc)
    return html_response(
        html_pages.status_page(summary, products, next_token, page_token=page_token)
    )


async def requests_page(request: web.Request) -> web.Response:
    """Your requests, newest first, as HTML; a page at a time."""
    page_token = request.query.get("page_token", "")
    channels, timeout = request.app[CHANNELS], request.app[SETTINGS].rpc_timeout
    try:
        answer = await channels.status.ListRequests(
            status_pb.ListRequestsRequest(page_size=PAGE_SIZE, page_token=page_token),
            timeout=timeout,
        )
    except (ImgpipeError, grpc.aio.AioRpcError) as exc:
        return html_error_response(request, exc)
    items = [
        json_views.request_item_json(found, request_path(found.request_id), None)
        for found in answer.requests
    ]
    return html_response(html_pages.requests_page(items, answer.next_page_token or None))


async def cancel_form(request: web.Request) -> web.Response:
    """The status page's Cancel button: cancel, then 303 back to the status page."""
    request_id = request.match_info["request_id"].strip()
    try:
        await request.app[CHANNELS].status.CancelRequest(
            status_pb.CancelRequestRequest(request_id=request_id),
            timeout=request.app[SETTINGS].bulk_rpc_timeout,
        )
    except (ImgpipeError, grpc.aio.AioRpcError) as exc:
        return html_error_response(request, exc)
    return web.Response(
        status=303, headers={**SECURITY_HEADERS, "Location": request_path(request_id)}
    )


def html_error_response(
    request: web.Request, exc: ImgpipeError | grpc.aio.AioRpcError
) -> web.Response:
    """An HTML page for what a merchant can act on; anything else is re-raised, so the error
    middleware logs it and answers its JSON 500."""
    error = error_from_rpc(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
    if error.http_status not in _HTML_ERROR_STATUSES:
        raise exc
    if error.http_status >= 500:
        log.warning("page failed: %s", error, extra={"path": request.path, "code": error.code})
    if error.http_status == 401:
        return key_response(request, error.http_status)
    return html_response(html_pages.error_page(error), error.http_status)


def key_response(request: web.Request, status: int = 401) -> web.Response:
    """The API key form, for an HTML route that was refused for want of a key.

    For the auth middleware too: a browser asking for text/html gets this rather than JSON.
    """
    back = request.path_qs if request.method == "GET" else "/"
    return html_response(html_pages.key_page(back), status)
