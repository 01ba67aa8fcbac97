"""One upload is one OpenTelemetry trace: gateway -> ingest -> (Redis) worker -> (Redis) status
-> webhook, recorded in process by an InMemorySpanExporter and checked span by span.

Every piece runs as the services run it, in this process: the gateway application, ingest on a
real gRPC server, the feeder, the worker's consume loop, the webhook dispatcher's two loops, on
real Postgres and Redis, with a real image origin and a webhook receiver on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import functools
import io
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import create_app
from gateway.config import GatewaySettings
from services.common import telemetry, tracing
from services.common.csv_format import CsvLimits
from services.common.fetch import FetchAllow, FetchLimits, fetch_image, make_session
from services.common.image_options import ImageLimits
from services.common.metrics import GrpcServerInterceptor
from services.common.outcome import RetryPolicy
from services.common.storage import Storage, StorageConfig
from services.common.streams import StreamNames, TaskConsumer
from services.ingest.feeder import Feeder
from services.ingest.servicer import IngestServicer, registrar
from services.status.config import WebhookSettings
from services.status.webhooks import WebhookDispatcher
from services.worker.processor import Processor
from services.worker.runner import ConsumePolicy, consume
from testing.databases import own_database
from testing.gateway import GatewayServer
from testing.grpc_servers import on_loopback
from testing.listeners import Receiver, serve_receiver
from testing.origin import ImageOrigin
from testing.polling import wait_until_async

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"imgpipe-trace-test-key").decode()
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
UPLOAD_CALL = "/imgpipe.v1.IngestService/UploadCsv"


@pytest.fixture
async def caller() -> AsyncIterator[aiohttp.ClientSession]:
    """The API's caller: made before tracing starts, so it sends its own `traceparent` (an
    instrumented session would send its client span's instead)."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def exporter(caller: aiohttp.ClientSession) -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test, every span the services end kept in memory."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(telemetry.RequestSpansOnly(SimpleSpanProcessor(spans)))
    with telemetry.enabled(provider):
        yield spans
    provider.shutdown()


@pytest.fixture
async def pool(postgres_server_url: str) -> AsyncIterator[asyncpg.Pool]:
    # A database of its own: the dispatcher and the feeder act on every row they find.
    async with own_database(postgres_server_url, "imgpipe_traces") as pool:
        yield pool


@contextlib.asynccontextmanager
async def ingest_server(
    pool: asyncpg.Pool,
    client: redis.asyncio.Redis,
    names: StreamNames,
    feeder: Feeder,
    allow: FetchAllow,
) -> AsyncIterator[str]:
    """Ingest on a real gRPC server with the services' own interceptor, as run_service has it."""
    servicer = IngestServicer(
        pool, client, names, CsvLimits(), fetch_allow=allow, wake_feeder=feeder.wake
    )
    async with on_loopback(registrar(servicer), [GrpcServerInterceptor()]) as address:
        yield address


@contextlib.asynccontextmanager
async def loops(*bodies: object) -> AsyncIterator[asyncio.Event]:
    """Background loops (each `body(stop)`) for the block; stopped and awaited after it."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(body(stop)) for body in bodies]  # type: ignore[operator]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=15)


def one_product_csv(url: str) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows([["S. No.", "Product Name", "Input Image Urls"], ["1", "Shoe", url]])
    return out.getvalue().encode()


def only(spans: Sequence[ReadableSpan], name: str, kind: SpanKind | None = None) -> ReadableSpan:
    found = [s for s in spans if s.name == name and (kind is None or s.kind == kind)]
    assert len(found) == 1, f"{name}: {[(s.name, s.kind) for s in spans]}"
    return found[0]


def parent_of(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    parents = [s for s in spans if s.context.span_id == span.parent.span_id]
    assert len(parents) == 1, f"the parent of {span.name} was not exported"
    return parents[0]


def children_of(span: ReadableSpan, spans: Sequence[ReadableSpan]) -> list[str]:
    return sorted(
        s.name for s in spans if s.parent is not None and s.parent.span_id == span.context.span_id
    )


async def test_one_upload_is_one_trace_from_the_gateway_to_the_webhook(
    exporter: InMemorySpanExporter,
    caller: aiohttp.ClientSession,
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    storage: Storage,
    origin: ImageOrigin,
    tmp_path: Path,
) -> None:
    # Sessions made now, with tracing on: their requests are client spans.
    images = make_session(FetchAllow.parse(f"127.0.0.1:{origin.port}"), FetchLimits())
    async with serve_receiver(SECRET) as receiver:
        hooks = WebhookSettings(
            secret=SECRET,
            public_api_url="https://imgpipe.example",
            schedule=(0.05, 0.05, 0.05),
            fetch_allow=FetchAllow.parse(f"127.0.0.1:{receiver.port}"),
        )
        webhooks = make_session(hooks.fetch_allow, hooks.fetch_limits)
        try:
            request_id, answered = await upload_and_wait(
                caller,
                pool,
                redis_client,
                names,
                storage,
                images,
                webhooks,
                hooks,
                receiver,
                origin,
                tmp_path,
            )
        finally:
            await images.close()
            await webhooks.close()

    spans = await wait_until_async(
        lambda: finished(exporter, "deliver webhook"), message="the webhook's span"
    )
    assert {s.context.trace_id for s in spans} == {int(TRACE_ID, 16)}, "one trace, no other"
    assert not [s.name for s in spans if s.parent is None], "every span continues the caller's"

    gateway = only(spans, "POST /upload", SpanKind.SERVER)
    assert format(gateway.context.span_id, "016x") == answered  # the traceparent answered
    assert format(gateway.parent.span_id, "016x") == CALLER.split("-")[2]  # type: ignore[union-attr]
    # A client-streaming call has no client span (services/common/telemetry.py says why): the
    # gateway's request span is the parent of ingest's.
    ingest = only(spans, UPLOAD_CALL, SpanKind.SERVER)
    assert parent_of(ingest, spans) is gateway
    # The Redis Streams hop: the ImageTask carried the upload's span (through the feeder).
    worker = only(spans, "process image", SpanKind.CONSUMER)
    assert parent_of(worker, spans) is ingest
    assert worker.attributes is not None and worker.attributes["imgpipe.request_id"] == request_id
    stages = children_of(worker, spans)
    for stage in ("fetch", "decode", "encode", "store", "record", "finish request"):
        assert stage in stages
    fetch, decode, encode = (only(spans, name) for name in ("fetch", "decode", "encode"))
    assert "GET" in children_of(fetch, spans)  # the download itself, by the aiohttp client
    assert fetch.end_time <= decode.start_time <= decode.end_time <= encode.start_time  # type: ignore[operator]
    assert encode.end_time <= only(spans, "store").start_time  # type: ignore[operator]
    # The second hop: the RequestEvent carried the span that finished the request.
    scheduled = only(spans, "schedule webhook", SpanKind.CONSUMER)
    assert parent_of(scheduled, spans) is only(spans, "finish request")
    delivered = only(spans, "deliver webhook")
    assert parent_of(delivered, spans) is scheduled
    assert "POST" in children_of(delivered, spans)
    # Postgres and Redis calls made for the upload are in it too.
    systems = {(s.attributes or {}).get("db.system") for s in spans}
    assert {"postgresql", "redis"} <= systems


async def upload_and_wait(
    caller: aiohttp.ClientSession,
    pool: asyncpg.Pool,
    client: redis.asyncio.Redis,
    names: StreamNames,
    storage: Storage,
    images: aiohttp.ClientSession,
    webhooks: aiohttp.ClientSession,
    hooks: WebhookSettings,
    receiver: Receiver,
    origin: ImageOrigin,
    store: Path,
) -> tuple[str, str]:
    """Upload one image through the gateway with every service running; once the webhook has
    arrived, its request id and the span id the gateway answered with."""

    fetch = functools.partial(fetch_image, images, limits=FetchLimits())
    feeder = Feeder(pool=pool, redis=client, names=names, window=1000, lookahead=1000, poll=0.05)
    with ThreadPoolExecutor(1) as executor:
        processor = Processor(
            pool=pool,
            redis=client,
            names=names,
            storage=storage,
            fetch=fetch,
            executor=executor,
            image_limits=ImageLimits(),
            retry=RetryPolicy(max_attempts=1),
        )
        consumer = TaskConsumer(client, names, "trace-test")
        dispatcher = WebhookDispatcher(
            pool=pool, redis=client, names=names, session=webhooks, settings=hooks
        )

        async def working(stop: asyncio.Event) -> None:
            await consume(consumer, processor, ConsumePolicy(concurrency=1), stop)

        async with (
            ingest_server(pool, client, names, feeder, hooks.fetch_allow) as ingest_addr,
            loops(feeder.run, working, dispatcher.run_events, dispatcher.run_deliveries),
        ):
            settings = GatewaySettings(
                ingest_addr=ingest_addr,
                status_addr=ingest_addr,  # not called by an upload
                storage=StorageConfig((store / "gateway").as_uri()),
            )
            gateway = GatewayServer(create_app(settings), host="127.0.0.1")
            await gateway.start_server()
            try:
                form = aiohttp.FormData()
                form.add_field("webhook_url", receiver.url("/hooks/imgpipe"))
                form.add_field(
                    "file",
                    one_product_csv(origin.url("/img/a.jpg")),
                    filename="p.csv",
                    content_type="text/csv",
                )
                async with caller.post(
                    gateway.make_url("/upload"), data=form, headers={"traceparent": CALLER}
                ) as response:
                    assert response.status == 202, await response.text()
                    request_id: str = (await response.json())["request_id"]
                    answered = tracing.parse_traceparent(response.headers["traceparent"])
                assert answered is not None and answered.trace_id == TRACE_ID
            finally:
                await gateway.close()

            async def arrived() -> bool:
                return bool(receiver.received)

            await wait_until_async(arrived, timeout=30, message="the webhook")
    return request_id, answered.span_id


async def finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan] | None:
    """Every span exported so far, once one named `name` has ended (None before)."""
    spans = list(exporter.get_finished_spans())
    return spans if any(s.name == name for s in spans) else None


def test_without_otel_variables_nothing_is_traced() -> None:
    assert not telemetry.wanted({})
    assert not telemetry.wanted({"OTEL_TRACES_EXPORTER": "none"})
    assert not telemetry.wanted(
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    )
    assert telemetry.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert telemetry.wanted({"OTEL_TRACES_EXPORTER": "console"})
    with telemetry.configure("test", {}), telemetry.span("nothing", parent=CALLER):
        assert tracing.current_trace() is None  # no span was made current
    assert tracing.current_trace() is None


def test_otel_variables_turn_tracing_on_for_the_block() -> None:
    environ = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "imgpipe-test"}
    with telemetry.configure("test", environ):
        with telemetry.span("a task", parent=CALLER):
            current = tracing.current_trace()
            assert current is not None and current.trace_id == TRACE_ID
            assert tracing.current_traceparent().startswith(f"00-{TRACE_ID}-")
        assert tracing.current_trace() is None
    with telemetry.span("after", parent=CALLER):
        assert tracing.current_trace() is None  # off again, instrumentations removed


def test_without_the_extra_otel_variables_only_warn(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(telemetry, "trace", None)  # as when imgpipe[otel] is not installed
    assert not telemetry.available()
    environ = {"OTEL_TRACES_EXPORTER": "console"}
    with telemetry.configure("test", environ), telemetry.span("a task", parent=CALLER):
        assert tracing.current_trace() is None
    assert "imgpipe[otel] is not installed" in caplog.text
