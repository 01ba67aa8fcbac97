"""The REST handlers: validate the HTTP input, call ingest or status, render JSON.

Errors are raised, never rendered here: `gateway.http_errors.error_middleware` turns ImgpipeError,
gRPC errors and aiohttp's HTTP exceptions into the JSON error body.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2

from gateway import json_views
from gateway.http_credentials import presented
from gateway.keys import CHANNELS, DOWNLOADS, IN_FLIGHT, PRODUCT_PAGES, SETTINGS, STORAGE
from gateway.output_csv import send_stored_csv, stream_output_csv
from gateway.product_page_cache import ProductPageKey, Version
from gateway.upload import upload_csv
from gateway.urls import output_csv_link, output_csv_url, status_url
from services.common import tracing
from services.common.errors import Conflict, Detail, InvalidArgument, NotFound, Unavailable
from services.common.page_token import decode_page_token
from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.storage import is_image_key

log = logging.getLogger(__name__)

A = TypeVar("A")
B = TypeVar("B")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# /readyz must answer quickly even when a backend hangs.
READY_TIMEOUT = 2.0
KEEPALIVE = 15.0
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]")


async def upload(request: web.Request) -> web.Response:
    accepted = await upload_csv(request, request.app[CHANNELS].ingest, request.app[SETTINGS])
    tracing.set_request_id(accepted.request_id)  # on this request's access log line
    url = status_url(request, accepted.request_id)
    return web.json_response(
        json_views.accepted_json(accepted, url),
        # An idempotent replay finds the earlier request: nothing new was accepted.
        status=202 if accepted.created else 200,
        headers={"Location": url},
    )


async def status(request: web.Request) -> web.Response:
    request_id = _request_id(request)
    page_size = _page_size(request.query.get("page_size", ""))
    page_token = request.query.get("page_token", "")
    channels, timeout = request.app[CHANNELS], request.app[SETTINGS].rpc_timeout
    # Decoded here, strictly: the cache is keyed on the position, and a token that is not
    # the one canonical spelling of a position is refused before anything is read.
    pages, key = (
        request.app[PRODUCT_PAGES],
        ProductPageKey(request_id, page_size, decode_page_token(page_token)),
    )
    get_request = channels.status.GetRequest(
        status_pb.GetRequestRequest(request_id=request_id), timeout=timeout
    )

    def list_products() -> Awaitable[status_pb.ListProductsResponse]:
        return channels.status.ListProducts(
            status_pb.ListProductsRequest(
                request_id=request_id, page_size=page_size, page_token=page_token
            ),
            timeout=timeout,
        )

    body: bytes | None = None
    if pages.known(key):
        # Polled before: the head alone says whether the kept page still holds.
        found = (await get_request).request
        body = pages.get(key, Version.of(found))
        page = None if body is not None else await list_products()
    else:
        # Both calls at once: the answer waits for the slower one, not for their sum.
        got, page = await _both(get_request, list_products())
        found = got.request
    if page is not None:
        body = json_views.products_members(page)
        pages.put(key, Version.of(found), body)
    assert body is not None
    return web.Response(
        body=json_views.join_members(
            json_views.request_json(found, output_csv_link(request, found)), body
        ),
        content_type="application/json",
    )


async def _both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Await both; if either fails, raise its error (the first one's when both fail)."""
    one, two = await asyncio.gather(first, second, return_exceptions=True)
    for outcome in (one, two):
        if isinstance(outcome, BaseException):
            raise outcome
    return one, two  # type: ignore[return-value]


async def events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: `progress` whenever an image becomes final, then `final`, then the
    stream ends. A comment line every KEEPALIVE seconds keeps proxies from closing it.

    A stream lasts at most IMGPIPE_WATCH_TIMEOUT (10 min): then a `reconnect` event ends it and
    the client opens a new one (EventSource does so by itself). Each open stream counts against
    the key's `streams` limit in the status service; over it, the answer is a JSON 429."""
    request_id = _request_id(request)
    settings = request.app[SETTINGS]
    call = request.app[CHANNELS].status.WatchRequest(
        status_pb.WatchRequestRequest(request_id=request_id), timeout=settings.watch_timeout
    )
    updates = aiter(call)
    try:
        # The first answer decides the status code: a 404 or 429 is still a JSON error, not a
        # stream.
        first = await anext(updates)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        update: status_pb.WatchRequestResponse | None = first
        final = False
        try:
            while update is not None:
                found = update.request
                final = json_views.is_final(found)
                csv_url = output_csv_url(request, found.request_id) if final else None
                event = json_views.request_json(found, csv_url)
                await response.write(json_views.sse("final" if final else "progress", event))
                update = await _next_or_keepalive(updates, response)
            if not final:  # the status service's own time limit
                await response.write(json_views.sse("reconnect", {"reason": "time_limit"}))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                await response.write(json_views.sse("reconnect", {"reason": "time_limit"}))
            else:
                # Headers are sent: say why the stream ends, in the stream; the client
                # reconnects.
                log.warning("live progress interrupted", extra={"error": exc.code().name})
                await response.write(json_views.sse("error", {"code": "unavailable"}))
        await response.write_eof()
        return response
    finally:
        call.cancel()


async def _next_or_keepalive(
    updates: AsyncIterator[status_pb.WatchRequestResponse], response: web.StreamResponse
) -> status_pb.WatchRequestResponse | None:
    pending = asyncio.ensure_future(anext(updates, None))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE)
            if done:
                return pending.result()
            await response.write(b": keep-alive\n\n")
    finally:
        pending.cancel()


async def output_csv(request: web.Request) -> web.StreamResponse:
    request_id = _request_id(request)
    channels, storage = request.app[CHANNELS], request.app[STORAGE]
    got = await channels.status.GetRequest(
        status_pb.GetRequestRequest(request_id=request_id),
        timeout=request.app[SETTINGS].rpc_timeout,
    )
    found = got.request
    if not json_views.is_final(found):
        raise Conflict("the request is not finished yet")
    if not found.output_csv_key:
        raise NotFound("this request has no output CSV")
    filename = f"imgpipe-{_UNSAFE_FILENAME.sub('_', found.request_id or request_id)}.csv"
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    # Each download holds a page of rows, or a piece of the stored copy, while its client reads:
    # IMGPIPE_GATEWAY_DOWNLOADS at a time per caller.
    with request.app[DOWNLOADS].hold(_caller(request)):
        if storage.presigned:
            # Signed URLs expire: render the CSV now instead of serving the stored copy.
            return await stream_output_csv(request, found.request_id, headers)
        try:
            size, pieces = await storage.read(found.output_csv_key)
        except FileNotFoundError:
            raise NotFound("the output CSV of this request was not found") from None
        return await send_stored_csv(request, size, pieces, headers)


def _caller(request: web.Request) -> str:
    """Who counts against a per-caller cap of this gateway: the credential, else the address."""
    credential = presented(request)
    if credential is not None and credential.token:
        return f"{credential.scheme} {credential.token}"
    return f"address {request.remote or ''}"


async def retry(request: web.Request) -> web.Response:
    """Put a request's failed images back in the queue (an operator's action)."""
    request_id = _request_id(request)
    answer = await request.app[CHANNELS].ingest.RetryFailedImages(
        ingest_pb.RetryFailedImagesRequest(request_id=request_id),
        timeout=request.app[SETTINGS].bulk_rpc_timeout,
    )
    return web.json_response(
        json_views.retry_json(answer, status_url(request, answer.request_id)), status=202
    )


async def list_requests(request: web.Request) -> web.Response:
    """The caller's requests, newest first, a page at a time; `status=` keeps one status."""
    answer = await request.app[CHANNELS].status.ListRequests(
        status_pb.ListRequestsRequest(
            page_size=_page_size(request.query.get("page_size", "")),
            page_token=request.query.get("page_token", ""),
            status=_status_filter(request.query.get("status", "")),
        ),
        timeout=request.app[SETTINGS].rpc_timeout,
    )
    items = [
        json_views.request_item_json(
            found, status_url(request, found.request_id), output_csv_link(request, found)
        )
        for found in answer.requests
    ]
    return web.json_response({"requests": items, "next_page_token": answer.next_page_token or None})


async def cancel(request: web.Request) -> web.Response:
    """Stop a running request; cancelling a Cancelled request again answers the same state."""
    answer = await request.app[CHANNELS].status.CancelRequest(
        status_pb.CancelRequestRequest(request_id=_request_id(request)),
        timeout=request.app[SETTINGS].bulk_rpc_timeout,
    )
    found = answer.request
    return web.json_response(json_views.request_json(found, output_csv_link(request, found)))


async def delete(request: web.Request) -> web.Response:
    """Delete a final request with its stored objects: 204, then every URL of it is 404."""
    request_id = _request_id(request)
    await request.app[CHANNELS].status.DeleteRequest(
        status_pb.DeleteRequestRequest(request_id=request_id),
        # Listing and deleting the objects of a large request takes longer than a read.
        timeout=request.app[SETTINGS].bulk_rpc_timeout,
    )
    return web.Response(status=204)


def _status_filter(raw: str) -> request_pb2.RequestStatus.ValueType:
    if not raw:
        return request_pb2.REQUEST_STATUS_UNSPECIFIED
    if raw in json_views.LISTED_STATUSES:
        return request_pb2.RequestStatus.Value(f"REQUEST_STATUS_{raw.upper()}")
    raise InvalidArgument(
        f"status must be one of {', '.join(json_views.LISTED_STATUSES)}",
        [Detail(message=f"not {raw[:40]!r}", column="status")],
    )


async def webhooks(request: web.Request) -> web.Response:
    """Every webhook attempt of a request, oldest first."""
    answer = await request.app[CHANNELS].status.ListWebhookDeliveries(
        status_pb.ListWebhookDeliveriesRequest(request_id=_request_id(request)),
        timeout=request.app[SETTINGS].rpc_timeout,
    )
    return web.json_response(
        {"deliveries": [json_views.delivery_json(d) for d in answer.deliveries]}
    )


async def redeliver_webhook(request: web.Request) -> web.Response:
    """Send the request's latest event to its webhook again."""
    answer = await request.app[CHANNELS].status.RedeliverWebhook(
        status_pb.RedeliverWebhookRequest(request_id=_request_id(request)),
        timeout=request.app[SETTINGS].rpc_timeout,
    )
    return web.json_response({"delivery": json_views.delivery_json(answer.delivery)}, status=202)


async def webhook_secret(request: web.Request) -> web.Response:
    """The caller's webhook signing secret (and the previous one, in its grace period)."""
    answer = await request.app[CHANNELS].status.GetWebhookSecret(
        status_pb.GetWebhookSecretRequest(), timeout=request.app[SETTINGS].rpc_timeout
    )
    return _secret_response(answer.secret)


async def rotate_webhook_secret(request: web.Request) -> web.Response:
    """A new signing secret for the caller; the old one signs too for the grace period."""
    answer = await request.app[CHANNELS].status.RotateWebhookSecret(
        status_pb.RotateWebhookSecretRequest(), timeout=request.app[SETTINGS].rpc_timeout
    )
    return _secret_response(answer.secret)


def _secret_response(secret: status_pb.WebhookSecret) -> web.Response:
    # A secret must not stay in a shared cache or the browser's.
    return web.json_response(
        json_views.webhook_secret_json(secret), headers={"Cache-Control": "no-store"}
    )


async def queue(request: web.Request) -> web.Response:
    """How much work waits, is in flight, or was dead-lettered."""
    limit = request.query.get("dead_letters", "20").strip()
    if not (limit.isascii() and limit.isdigit() and int(limit) <= 100):
        raise InvalidArgument(
            "dead_letters must be an integer from 0 to 100",
            [Detail(message=f"not {limit[:40]!r}", column="dead_letters")],
        )
    stats = await request.app[CHANNELS].status.GetQueueStats(
        status_pb.GetQueueStatsRequest(dead_letter_limit=int(limit)),
        timeout=request.app[SETTINGS].rpc_timeout,
    )
    return web.json_response(json_views.queue_json(stats))


async def files(request: web.Request) -> web.FileResponse:
    root = request.app[STORAGE].local_root
    key = request.match_info["key"]
    path = resolve_under(root, key) if root is not None else None
    if path is None:
        raise NotFound("no such file")
    # The store holds caller-influenced bytes: never let a browser guess another type.
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": _cache_control(key)}
    return web.FileResponse(path, headers=headers)


IMMUTABLE = "public, max-age=31536000, immutable"


def _cache_control(key: str) -> str:
    # An output image's key names one encoding of one image forever: caches may keep it a year
    # without asking again (RFC 8246). Anything else (the output CSV, which a retry rewrites)
    # is revalidated against its ETag and Last-Modified on every use.
    return IMMUTABLE if is_image_key(key) else "no-cache"


def resolve_under(root: Path, key: str) -> Path | None:
    """The regular file `key` names inside `root`, or None if it is missing or escapes `root`.

    `..` segments, absolute keys and symlinks are resolved first, so a key pointing outside
    the store by any of them is refused.
    """
    if not key or "\x00" in key:
        return None
    try:
        path = (root / key).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
    except OSError:  # a name too long, a loop of links: not a file we serve
        return None
    return path


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[IN_FLIGHT].draining.is_set():
        raise Unavailable("shutting down")
    channels = request.app[CHANNELS]
    deadline = min(READY_TIMEOUT, request.app[SETTINGS].rpc_timeout)
    problems = [
        problem
        for problem in await asyncio.gather(
            _not_ready("ingest", channels.ingest_health, deadline),
            _not_ready("status", channels.status_health, deadline),
        )
        if problem is not None
    ]
    if problems:
        names = ", ".join(problem.column for problem in problems)
        raise Unavailable(f"not ready: {names} not serving", problems)
    return web.json_response({"status": "ready"})


async def _not_ready(name: str, health: Any, deadline: float) -> Detail | None:
    """None when the backend reports SERVING, else what is wrong with it."""
    try:
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=deadline)
    except grpc.aio.AioRpcError as exc:
        return Detail(message=f"health check failed: {exc.code().name}", column=name)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return Detail(message=f"reports {state}", column=name)
    return None


def _request_id(request: web.Request) -> str:
    request_id = (
        request.match_info.get("request_id") or request.query.get("request_id", "")
    ).strip()
    if not request_id:
        raise InvalidArgument(
            "request_id is required",
            [Detail(message="give the request id in the path or the query", column="request_id")],
        )
    return request_id


def _page_size(raw: str) -> int:
    raw = raw.strip()
    if not raw:
        return DEFAULT_PAGE_SIZE
    if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_PAGE_SIZE:
        return int(raw)
    raise InvalidArgument(
        f"page_size must be an integer from 1 to {MAX_PAGE_SIZE}",
        [Detail(message=f"not {raw[:40]!r}", column="page_size")],
    )
