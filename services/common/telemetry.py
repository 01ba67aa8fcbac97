"""OpenTelemetry traces, when the `otel` extra is installed and the OTEL_* variables ask for them.

Without the extra, or without a variable naming where spans go, nothing here does anything and
services/common/tracing.py carries and logs a hand-written `traceparent` as it always did.

With it, `configure(service, environ)` (called once by each service's main) builds a tracer
provider from the standard variables and instruments the libraries a request passes through:
grpc.aio servers and channels, the aiohttp server (the gateway) and its client sessions (image
downloads, webhooks), asyncpg and redis. tracing.py then takes the current span from
OpenTelemetry, so the `traceparent` written into ImageTask and RequestEvent, sent as gRPC
metadata and logged as trace_id/span_id is the exported span's: one upload is one trace across
the Redis Streams hops. `span()` adds the pipeline's own spans (a worker's task and its stages,
a webhook) and `record_span()` those timed inside a compress thread.

Variables read (https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/):
OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER (otlp, console, none; comma-separated), the
OTEL_EXPORTER_OTLP_* family, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER
and the instrumentations' own OTEL_PYTHON_* variables. Tracing starts when OTEL_TRACES_EXPORTER
or an OTLP endpoint is set: a developer's virtualenv has the extra, and must not send every test
run's spans to a collector that is not there.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from services.common import tracing

log = logging.getLogger(__name__)

try:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the `otel` extra is not installed
    trace = None  # type: ignore[assignment]

# The tracer of the pipeline's own spans while tracing is on; None otherwise.
_tracer: Any = None
_CLIENT_STREAMING: frozenset[str] = frozenset()


def available() -> bool:
    """True when the `otel` extra is installed."""
    return trace is not None


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables ask for traces (see the module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return any(environ.get(name) for name in endpoints)


@contextlib.contextmanager
def configure(service: str, environ: Mapping[str, str]) -> Iterator[None]:
    """Trace this process while the block runs when the extra is installed and `environ` asks
    for it (spans still queued are exported on exit); otherwise do nothing."""
    if not wanted(environ):
        yield
        return
    if not available():
        log.warning("OTEL_* variables are set but imgpipe[otel] is not installed: no traces")
        yield
        return
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": f"imgpipe-{service}"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in _exporters(environ):
        provider.add_span_processor(RequestSpansOnly(BatchSpanProcessor(exporter)))
    try:
        with enabled(provider):
            log.info("tracing", extra={"otel_exporters": environ.get("OTEL_TRACES_EXPORTER")})
            yield
    finally:
        provider.shutdown()


def _exporters(environ: Mapping[str, str]) -> list[Any]:
    found: list[Any] = []
    for name in (environ.get("OTEL_TRACES_EXPORTER") or "otlp").lower().split(","):
        name = name.strip()
        if name == "console":
            found.append(ConsoleSpanExporter())
        elif name == "otlp":
            found.append(_otlp_exporter(environ))
        elif name and name != "none":
            log.warning("unknown OTEL_TRACES_EXPORTER ignored", extra={"exporter": name})
    return found


def _otlp_exporter(environ: Mapping[str, str]) -> Any:
    # The exporters read their endpoint, headers, timeout and TLS files from OTEL_EXPORTER_OTLP_*.
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol.strip() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:  # http/protobuf
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


@contextlib.contextmanager
def enabled(provider: Any) -> Iterator[None]:
    """Instrument the libraries and record the pipeline's spans with `provider` while the block
    runs (tests pass one with an in-memory exporter). gRPC channels and servers, aiohttp
    applications and client sessions made inside the block are traced; Redis clients and
    asyncpg connections are traced whenever they were made."""
    global _tracer, _CLIENT_STREAMING
    _CLIENT_STREAMING = _client_streaming_methods()
    # Imported here, not at the top: only a process that traces loads the instrumentations.
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
    )
    from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_prefix
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    instrumentors: list[Any] = [
        # Probes and tools call health and reflection every few seconds: not traces.
        GrpcAioInstrumentorServer(  # type: ignore[no-untyped-call]
            filter_=negate(
                any_of(service_prefix("grpc.health."), service_prefix("grpc.reflection."))
            )
        ),
        GrpcAioInstrumentorClient(filter_=_not_client_streaming),  # type: ignore[no-untyped-call]
        # Its server span is the outermost middleware of every web.Application made from now on.
        AioHttpServerInstrumentor(),
        AioHttpClientInstrumentor(),
        AsyncPGInstrumentor(),  # type: ignore[no-untyped-call]
        RedisInstrumentor(),
    ]
    with warnings.catch_warnings():
        # The aiohttp server instrumentor subclasses web.Application, which aiohttp discourages
        # (a DeprecationWarning at class creation); the subclass only adds the middleware.
        warnings.filterwarnings("ignore", "Inheritance class", DeprecationWarning)
        for instrumentor in instrumentors:
            instrumentor.instrument(tracer_provider=provider)
    _tracer = provider.get_tracer("imgpipe")
    tracing.use_span_source(_current)
    try:
        yield
    finally:
        tracing.use_span_source(None)
        _tracer = None
        for instrumentor in reversed(instrumentors):
            instrumentor.uninstrument()


def _client_streaming_methods() -> frozenset[str]:
    """`/package.Service/Method` of every method whose client streams its requests."""
    from services.common.pb.imgpipe.v1 import (
        ingest_service_pb2,
        session_service_pb2,
        status_service_pb2,
    )

    return frozenset(
        f"/{service.full_name}/{method.name}"
        for module in (ingest_service_pb2, session_service_pb2, status_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        if method.client_streaming
    )


def _not_client_streaming(details: Any) -> bool:
    # The stream-unary interceptor awaits the call's status before handing the call back, so a
    # caller that writes its requests (gateway/upload.py: UploadCsv) would wait forever. Such a
    # call carries the caller's span instead (tracing.client_interceptors) and has no client
    # span of its own.
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    return method not in _CLIENT_STREAMING


def _current() -> tracing.TraceContext | None:
    """The current OpenTelemetry span as tracing.py's TraceContext (None outside any span)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return tracing.TraceContext(
        format(context.trace_id, "032x"), format(context.span_id, "016x"), context.trace_flags
    )


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    kind: str = "internal",
    attributes: Mapping[str, str | int | float] | None = None,
) -> Iterator[None]:
    """A span around the block: a child of `parent` (a `traceparent` from a stream message) when
    given, else of the current span. Nothing without tracing. An exception leaving the block
    marks the span failed. `kind`: internal, consumer or producer."""
    if _tracer is None:
        yield
        return
    context = _context_of(parent) if parent is not None else None
    with _tracer.start_as_current_span(
        name,
        context=context,
        kind=trace.SpanKind[kind.upper()],
        attributes=dict(attributes or {}),
    ):
        yield


def record_span(
    name: str, start_ns: int, end_ns: int, attributes: Mapping[str, str | int | float] | None = None
) -> None:
    """A child of the current span that ran from `start_ns` to `end_ns` (time.time_ns()): work
    timed where no span could be current (a compress thread). Nothing without tracing."""
    if _tracer is not None:
        _tracer.start_span(name, start_time=start_ns, attributes=dict(attributes or {})).end(
            end_time=end_ns
        )


def _context_of(traceparent: str) -> Context:
    # An empty or invalid value gives an empty context: the span starts a trace of its own.
    return TraceContextTextMapPropagator().extract({tracing.TRACEPARENT: traceparent})


if trace is not None:

    class RequestSpansOnly(SpanProcessor):
        """Passes on every span but the roots of background polling: a Redis read, a query or a
        download with no request around it (XREADGROUP every second, health probes, the feeder)
        would otherwise make a trace each, drowning the uploads' traces."""

        def __init__(self, inner: SpanProcessor) -> None:
            self.inner = inner

        def on_start(self, span: Any, parent_context: Context | None = None) -> None:
            self.inner.on_start(span, parent_context)

        def on_end(self, span: ReadableSpan) -> None:
            if span.parent is None and span.kind == trace.SpanKind.CLIENT:
                return
            self.inner.on_end(span)

        def shutdown(self) -> None:
            self.inner.shutdown()

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return self.inner.force_flush(timeout_millis)
