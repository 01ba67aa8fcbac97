"""Trace context: W3C `traceparent` parsing and formatting, and who the current work is for.

imgpipe propagates trace context the way OpenTelemetry does (W3C Trace Context,
https://www.w3.org/TR/trace-context/), without an OpenTelemetry SDK and without exporting
spans: the trace is what ties the JSON log lines of one caller's request together across
processes. Each process's unit of work is one span:

- the gateway takes the caller's `traceparent` header (or starts a trace), answers with its own
  `traceparent`, and sends it as gRPC metadata on every call it makes for that request;
- ingest and status continue it for the call (`server_span`), and ingest writes it into every
  ImageTask it publishes; a worker continues it for each task, and the finished event carries it
  to the webhook dispatcher.

Because the header format and the metadata key are the standard ones, an OpenTelemetry-
instrumented caller or proxy joins the same trace. `tracestate` is not forwarded.

With OpenTelemetry on (services/common/telemetry.py registers a span source), the current span
is OpenTelemetry's wherever one is current: what is logged, sent and written into messages is
then the exported span, and the hand-written context only fills in outside any span.

The current trace and request id live in context variables, so every log record made while
handling a call, a task or an event carries `trace_id`, `span_id` and `request_id`
(services/common/json_logs.py).
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.grpc_client import rewriting_interceptors

# The gRPC metadata key and the HTTP header: the W3C name, lower case as gRPC requires.
TRACEPARENT = "traceparent"

_HEX = re.compile(r"[0-9a-f]+")
_INVALID_TRACE_ID = "0" * 32
_INVALID_SPAN_ID = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One span's place in a trace: 32 hex digits of trace id, 16 of span id, 8 bits of flags."""

    trace_id: str
    span_id: str
    flags: int = 1  # bit 0: sampled

    @classmethod
    def new(cls) -> TraceContext:
        """The root span of a new trace (sampled: our logs record it)."""
        return cls(secrets.token_hex(16), _new_span_id(), 1)

    def child(self) -> TraceContext:
        """A new span in the same trace, keeping the caller's flags."""
        return TraceContext(self.trace_id, _new_span_id(), self.flags)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def parse_traceparent(value: str | None) -> TraceContext | None:
    """The context of a `traceparent` value, or None when it is missing or invalid.

    Per the specification: lower-case hex only; version `ff` is invalid; version 00 is exactly
    `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; a later version is read by the same
    layout and may carry more fields after another `-`. An all-zero trace or span id is invalid.
    """
    if not value:
        return None
    value = value.strip()
    if len(value) < 55:
        return None
    version, trace_id, span_id, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    if not all(_HEX.fullmatch(part) for part in (version, trace_id, span_id, flags)):
        return None
    if version == "ff" or (version == "00" and len(value) != 55):
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    if trace_id == _INVALID_TRACE_ID or span_id == _INVALID_SPAN_ID:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16))


def continue_trace(traceparent: str | None) -> TraceContext:
    """This process's span: a child of `traceparent`, or the root of a new trace when it is
    missing or invalid (a caller's bad header never fails its request)."""
    parent = parse_traceparent(traceparent)
    return parent.child() if parent is not None else TraceContext.new()


def _new_span_id() -> str:
    while True:
        span_id = secrets.token_hex(8)
        if span_id != _INVALID_SPAN_ID:
            return span_id


# ---------------------------------------------------------------- the current work

_trace: ContextVar[TraceContext | None] = ContextVar("imgpipe_trace", default=None)
_request_id: ContextVar[str | None] = ContextVar("imgpipe_request_id", default=None)
_span_source: Callable[[], TraceContext | None] | None = None


def use_span_source(source: Callable[[], TraceContext | None] | None) -> None:
    """Take the current span from `source` (OpenTelemetry's) when it has one; None: stop."""
    global _span_source
    _span_source = source


def source_span() -> TraceContext | None:
    """The span current in the span source (OpenTelemetry's), if one is registered and has one."""
    return _span_source() if _span_source is not None else None


def current_trace() -> TraceContext | None:
    return source_span() or _trace.get()


def current_traceparent() -> str:
    """The current span as a `traceparent` value; '' outside any trace."""
    trace = current_trace()
    return trace.traceparent if trace is not None else ""


def current_request_id() -> str | None:
    return _request_id.get()


def set_trace(trace: TraceContext | None) -> None:
    """Set the trace for the rest of the current task (each call, request and stream task runs
    in a context of its own, so this never leaks into other work)."""
    _trace.set(trace)


def set_request_id(request_id: str | None) -> None:
    """Name the imgpipe request the current task works for, from now on (see set_trace)."""
    _request_id.set(request_id or None)


@contextlib.contextmanager
def bound(
    trace: TraceContext | None = None, request_id: str | None = None
) -> Iterator[TraceContext | None]:
    """Within the block, the given trace and request id are current; restored afterwards. For
    loops that handle one item after another in the same task."""
    trace_token = _trace.set(trace)
    request_token = _request_id.set(request_id or None)
    try:
        yield trace
    finally:
        _request_id.reset(request_token)
        _trace.reset(trace_token)


def server_span(metadata: Sequence[tuple[str, Any]] | None) -> TraceContext:
    """The span of a gRPC call, continued from its `traceparent` metadata."""
    values = [value for key, value in metadata or () if key == TRACEPARENT]
    return continue_trace(str(values[0]) if values else None)


# ---------------------------------------------------------------- gRPC clients


def _with_traceparent(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    trace = current_trace()
    if trace is None:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[TRACEPARENT] = trace.traceparent
    replaced: grpc.aio.ClientCallDetails = details._replace(metadata=metadata)  # type: ignore[attr-defined]
    return replaced


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send the current span as `traceparent` metadata on every call."""
    return rewriting_interceptors(_with_traceparent)
