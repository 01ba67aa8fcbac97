"""Prometheus metrics of every imgpipe process, and where they are served.

A process serves `/metrics` on its own port when IMGPIPE_METRICS_LISTEN=host:port is set
(`serving`); unset, nothing listens. The names and labels below are a contract: the alerts
and the dashboard in deploy/monitoring/ are written against them.

| metric | type | labels | reported by |
|---|---|---|---|
| imgpipe_images_total | counter | outcome (done, failed), code (OutcomeCode; "" if done) | worker |
| imgpipe_stage_duration_seconds | histogram | stage (fetch, decode, encode, store) | worker |
| imgpipe_image_bytes_total | counter | direction (in: downloaded, out: stored) | worker |
| imgpipe_request_duration_seconds | histogram | status (Completed, Failed) | worker |
| imgpipe_budget_wait_seconds | histogram | budget (bytes, pixels): wait per acquisition | worker |
| imgpipe_db_pool_connections | gauge | state (in_use, idle) | ingest, worker, status |
| imgpipe_db_pool_max_connections | gauge | — | ingest, worker, status |
| imgpipe_db_pool_waiting | gauge | — (callers waiting for a connection) | ingest, worker, status |
| imgpipe_stream_lag | gauge | stream, group: entries not yet delivered to the group | status |
| imgpipe_stream_pending | gauge | stream, group: delivered, not yet acknowledged | status |
| imgpipe_stream_oldest_age_seconds | gauge | stream, group: oldest unacknowledged entry | status |
| imgpipe_dead_letter_entries | gauge | — | status |
| imgpipe_backlog_images | gauge | — (images not final, from Postgres: what autoscales) | status |
| imgpipe_webhook_attempts_total | counter | result (WEBHOOK_RESULTS) | status |
| imgpipe_tasks_reclaimed_total | counter | — (taken over from a silent consumer) | worker |
| imgpipe_retention_requests_deleted_total | counter | — (by the retention janitor) | worker |
| imgpipe_retention_bytes_deleted_total | counter | — (stored bytes the janitor deleted) | worker |
| grpc_server_handled_total | counter | grpc_service, grpc_method, grpc_code | ingest, status |
| grpc_server_handling_seconds | histogram | grpc_service, grpc_method | ingest, status |
| http_requests_total | counter | method, route (the route template), status | gateway |
| http_request_duration_seconds | histogram | method, route | gateway |

Besides these, prometheus_client's own process_* and python_* metrics. The stream gauges and
the backlog are collected by the status service (services/status/stream_metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.common import tracing
from services.common.grpc_handlers import WrappingInterceptor, behavior_of, with_behavior

log = logging.getLogger(__name__)

# Seconds, from a cached thumbnail to a slow origin at the download timeout.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Calls and HTTP requests: uploads of large CSVs take minutes.
_CALL_BUCKETS = (*_BUCKETS, 120, 300)

# ---------------------------------------------------------------- worker

IMAGES = Counter(
    "imgpipe_images",
    "Images brought to a final state, by outcome and failure code",
    ["outcome", "code"],
)
IMAGES_DEFERRED = Counter(
    "imgpipe_images_deferred",
    "Images put back to wait for their next release: between fetch attempts (retry), for an"
    " origin's Retry-After (cooldown) or while every connection to the origin stayed busy"
    " (busy); their tasks gave their worker slots back",
    ["reason"],
)
STAGE_SECONDS = Histogram(
    "imgpipe_stage_duration_seconds",
    "Duration of each completed processing stage of one image",
    ["stage"],
    buckets=_BUCKETS,
)
IMAGE_BYTES = Counter(
    "imgpipe_image_bytes",
    "Bytes of done images: downloaded (in) and stored (out)",
    ["direction"],
)
IMAGES_REUSED = Counter(
    "imgpipe_images_reused",
    "Done images whose output was copied from the owner's earlier request (also in images)",
)
STAGES = ("fetch", "decode", "encode", "store")


# Seconds to hours: from accepted (POST /upload) to Completed or Failed, queueing included.
REQUEST_SECONDS = Histogram(
    "imgpipe_request_duration_seconds",
    "End-to-end time of a request, from accepted to final, observed when it finishes",
    ["status"],
    buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600, 86400),
)
BUDGET_WAIT_SECONDS = Histogram(
    "imgpipe_budget_wait_seconds",
    "Time one acquisition waited for a worker budget: download bytes and decoded pixels"
    " (services/worker/budget.py), or one of the connections to an origin"
    " (OriginTurns in services/common/fetch.py; a wait that gave up counts its time too)",
    ["budget"],
    buckets=(0.0005, *_BUCKETS),
)
BUDGETS = ("bytes", "pixels", "connections")
BATCH_SIZE = Histogram(
    "imgpipe_worker_batch_size",
    "Calls one round trip to Postgres or Redis served (services/worker/batching.py)",
    ["batch"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
# record: Done records (one statement per request); status: checks before a download;
# reuse: lookups of the owner's earlier outputs; ack: XACK; progress: PUBLISH of the newest
# counters per request.
BATCHES = ("record", "status", "reuse", "ack", "progress")


def prime_worker() -> None:
    """Create the worker's series at zero, so rates start from the first image."""
    IMAGES.labels("done", "")
    IMAGES_REUSED.inc(0)
    TASKS_RECLAIMED.inc(0)
    for stage in STAGES:
        STAGE_SECONDS.labels(stage)
    for direction in ("in", "out"):
        IMAGE_BYTES.labels(direction)
    for status in ("Completed", "Failed"):
        REQUEST_SECONDS.labels(status)
    for budget in BUDGETS:
        BUDGET_WAIT_SECONDS.labels(budget)
    for batch in BATCHES:
        BATCH_SIZE.labels(batch)


def budget_waited(budget: str) -> Callable[[float], None]:
    """What a budget calls with the seconds each acquisition waited."""
    return BUDGET_WAIT_SECONDS.labels(budget).observe


def batch_sized(batch: str) -> Callable[[int], None]:
    """What a Batcher calls with the size of each batch it runs."""
    return BATCH_SIZE.labels(batch).observe


def request_finished(status: str, seconds: float) -> None:
    REQUEST_SECONDS.labels(status).observe(max(seconds, 0.0))


TASKS_RECLAIMED = Counter(
    "imgpipe_tasks_reclaimed",
    "Tasks taken over (XAUTOCLAIM) after their consumer held them past the visibility timeout",
)
RETENTION_REQUESTS = Counter(
    "imgpipe_retention_requests_deleted", "Expired requests deleted by the retention janitor"
)
RETENTION_BYTES = Counter(
    "imgpipe_retention_bytes_deleted", "Stored bytes of the requests the retention janitor deleted"
)


def image_done(bytes_in: int, bytes_out: int, *, reused: bool = False) -> None:
    """`reused`: its output was copied from the owner's earlier request."""
    IMAGES.labels("done", "").inc()
    IMAGE_BYTES.labels("in").inc(bytes_in)
    IMAGE_BYTES.labels("out").inc(bytes_out)
    if reused:
        IMAGES_REUSED.inc()


def image_failed(code: str) -> None:
    IMAGES.labels("failed", code).inc()


# ---------------------------------------------------------------- ingest: the feeder

FEEDER_LOOKAHEAD = Gauge(
    "imgpipe_feeder_lookahead_tasks",
    "Released tasks the feeder let wait on the task stream at its last pass: what the workers"
    " took from it in IMGPIPE_SCHEDULER_LOOKAHEAD_SECONDS, between 4 and"
    " IMGPIPE_SCHEDULER_LOOKAHEAD",
)

RELEASES_SUPERSEDED = Counter(
    "imgpipe_releases_superseded",
    "Released tasks whose stream entry was not recorded: between the release's claim and its"
    " record, a worker made the image final or put it back to wait (and a retry may have"
    " released it again)",
)

# ---------------------------------------------------------------- status: webhooks

# A bounded set: what happened to one attempt, whether or not another follows.
WEBHOOK_RESULTS = (
    "succeeded",  # 2xx
    "http_4xx",  # 410 Gone included (it ends delivery)
    "http_5xx",
    "http_other",  # 1xx and 3xx: redirects are not followed
    "timeout",  # no answer within IMGPIPE_WEBHOOK_TIMEOUT
    "connection",  # refused, reset, DNS, TLS
    "blocked",  # the SSRF guard refused the address: never retried
    "not_configured",  # no IMGPIPE_WEBHOOK_SECRET: recorded as abandoned, nothing sent
    "error",  # anything else (a broken answer)
)
WEBHOOK_ATTEMPTS = Counter(
    "imgpipe_webhook_attempts", "Webhook delivery attempts, by result", ["result"]
)

# ---------------------------------------------------------------- gRPC servers

GRPC_HANDLED = Counter(
    "grpc_server_handled",
    "gRPC calls completed on the server, by status code",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of a gRPC call to its status (a stream's whole life)",
    ["grpc_service", "grpc_method"],
    buckets=_CALL_BUCKETS,
)
# The names other gRPC implementations (and their dashboards) use for the codes.
_CODE_NAMES = {
    code: "".join(part.title() for part in code.name.split("_")) for code in grpc.StatusCode
}
_CODE_NAMES[grpc.StatusCode.OK] = "OK"
_CODE_NAMES[grpc.StatusCode.CANCELLED] = "Canceled"
_MAX_REQUEST_ID = 64


class GrpcServerInterceptor(WrappingInterceptor):
    """Counts and times every call (but health and reflection), and makes its trace context
    and request id current while the servicer handles it, so its log lines carry them."""

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Probes and tools (PROBE_METHODS) are not API traffic: not counted."""
        return _observed(handler, method)


def _observed(
    handler: grpc.RpcMethodHandler[Any, Any], method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    h: Any = handler
    behavior = behavior_of(handler)
    service, _, name = method.lstrip("/").rpartition("/")
    seconds = GRPC_SECONDS.labels(service, name)

    def begin(request: Any, context: Any) -> float:
        # Each call runs in a task of its own: these values are seen by this call alone.
        tracing.set_trace(tracing.server_span(context.invocation_metadata()))
        if not h.request_streaming:
            request_id = getattr(request, "request_id", None)
            if isinstance(request_id, str) and 0 < len(request_id) <= _MAX_REQUEST_ID:
                tracing.set_request_id(request_id)
        return time.perf_counter()

    def end(started: float, context: Any, error: BaseException | None) -> None:
        seconds.observe(time.perf_counter() - started)
        GRPC_HANDLED.labels(service, name, _code_name(context, error)).inc()

    wrapped: Callable[..., Any]
    if h.response_streaming:

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            started = begin(request, context)
            error: BaseException | None = None
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                error = exc
                raise
            finally:
                end(started, context, error)

        wrapped = streaming
    else:

        async def unary(request: Any, context: Any) -> Any:
            started = begin(request, context)
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                end(started, context, exc)
                raise
            end(started, context, None)
            return response

        wrapped = unary
    return with_behavior(handler, wrapped)


def _code_name(context: Any, error: BaseException | None) -> str:
    if error is None or isinstance(error, grpc.aio.AbortError):
        # An abort set the code; a normal return leaves OK unless the servicer set one.
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return _CODE_NAMES[code]
        return "OK" if error is None else "Unknown"
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        # grpc cancels the handler when the caller cancels or its deadline passes.
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None and remaining <= 0:
            return _CODE_NAMES[grpc.StatusCode.DEADLINE_EXCEEDED]
        return _CODE_NAMES[grpc.StatusCode.CANCELLED]
    return _CODE_NAMES[grpc.StatusCode.UNKNOWN]  # what grpc answers for an uncaught exception


# ---------------------------------------------------------------- gateway

HTTP_REQUESTS = Counter(
    "http_requests",
    "HTTP requests answered by the gateway",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request (a streamed answer's whole life)",
    ["method", "route"],
    buckets=_CALL_BUCKETS,
)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"


def http_method_label(method: str) -> str:
    """Methods outside the standard ones are one label, so a caller cannot add series."""
    return method if method in HTTP_METHODS else "other"


# ---------------------------------------------------------------- Postgres pool


class PoolStats(Collector):
    """The asyncpg pool's connections in use and idle, its maximum, and the callers waiting
    for a connection, read at scrape time. `pool` needs `waiting` (BoundedWaitPool has it)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def collect(self) -> Iterable[Metric]:
        size, idle = self.pool.get_size(), self.pool.get_idle_size()
        connections = GaugeMetricFamily(
            "imgpipe_db_pool_connections", "Postgres pool connections", labels=["state"]
        )
        connections.add_metric(["in_use"], size - idle)
        connections.add_metric(["idle"], idle)
        yield connections
        yield GaugeMetricFamily(
            "imgpipe_db_pool_max_connections",
            "Connections the Postgres pool may open",
            value=self.pool.get_max_size(),
        )
        yield GaugeMetricFamily(
            "imgpipe_db_pool_waiting",
            "Callers waiting for a Postgres pool connection",
            value=self.pool.waiting,
        )


@contextlib.contextmanager
def reporting(collector: Collector) -> Iterator[None]:
    """`collector` is scraped while the block runs."""
    REGISTRY.register(collector)
    try:
        yield
    finally:
        REGISTRY.unregister(collector)


# ---------------------------------------------------------------- serving


@contextlib.contextmanager
def serving(listen: str) -> Iterator[None]:
    """Serve /metrics on `listen` (host:port) in a thread of its own while the block runs, so
    a busy event loop never delays a scrape; '' serves nothing."""
    if not listen:
        yield
        return
    host, _, port = listen.rpartition(":")
    server, thread = start_http_server(int(port), addr=host.strip("[]"))
    log.info("serving metrics", extra={"metrics_listen": listen})
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
