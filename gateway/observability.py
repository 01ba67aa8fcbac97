"""Every HTTP request's trace context, request id and metrics.

`observe_middleware` (the outermost middleware) continues the caller's `traceparent` header or
starts a trace, makes it current for the request (the gRPC calls made while answering carry it:
services/common/tracing.py), and counts and times the request by its route template, so a
thousand request ids are one series. `add_traceparent` answers with the gateway's own
`traceparent`, whose trace id finds the request's log lines in every service.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from gateway import access_log
from gateway.http_errors import Handler
from services.common import metrics, tracing

_MAX_REQUEST_ID = 64


def route_label(request: web.Request) -> str:
    """The matched route's template (`/status/{request_id}`), never the raw path."""
    if request.match_info.http_exception is not None:
        return metrics.UNMATCHED_ROUTE  # no such route (404) or method (405)
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else metrics.UNMATCHED_ROUTE


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # aiohttp answers each request in a task of its own (aiohttp#3406): these values are seen
    # by this request alone, its answer's headers and access log line included: no reset.
    # With OpenTelemetry, its server span (outside this middleware) is the request's span: kept
    # here, it is still the one answered and logged after the span's block has ended.
    header = request.headers.get(tracing.TRACEPARENT)
    tracing.set_trace(tracing.source_span() or tracing.continue_trace(header))
    request_id = request.match_info.get("request_id") or request.query.get("request_id", "")
    if 0 < len(request_id) <= _MAX_REQUEST_ID:
        tracing.set_request_id(request_id)
    method, route = metrics.http_method_label(request.method), route_label(request)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # passed through by the error middleware (redirects)
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the caller went away (the nginx convention)
        access_log.log_client_gone(request, time.perf_counter() - started)
        raise
    finally:
        metrics.HTTP_SECONDS.labels(method, route).observe(time.perf_counter() - started)
        metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()


async def add_traceparent(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every answer, streamed ones and errors included, says its trace.
    It runs in the request's task, after observe_middleware set the trace."""
    trace = tracing.current_trace()
    if trace is not None:
        response.headers[tracing.TRACEPARENT] = trace.traceparent


def setup(app: web.Application) -> None:
    app.on_response_prepare.append(add_traceparent)
