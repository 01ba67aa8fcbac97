"""The gRPC server interceptor and the gateway middleware against real servers on 127.0.0.1:
what they count, under which labels, and the trace context they carry; and the settings."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from gateway import observability
from gateway.config import GatewaySettings
from services.common import metrics, tracing
from services.common.config import ConfigError
from services.common.outcome import ImageFailure, OutcomeCode
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.ingest.config import IngestSettings
from services.local.launcher import metrics_ports, plan_stack
from services.status.webhooks import _failure_outcome
from testing.polling import wait_until_async

pytestmark = pytest.mark.unit

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
SERVICE = "imgpipe.test.Probe"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- gRPC


class Probe:
    """A servicer that remembers what was current while it ran."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, str | None]] = []

    def _remember(self) -> None:
        trace = tracing.current_trace()
        self.seen.append((trace.trace_id if trace else None, tracing.current_request_id()))

    async def get(self, request: status_pb.GetRequestRequest, context: Any) -> Any:
        self._remember()
        if request.request_id == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such request")
        if request.request_id == "boom":
            raise RuntimeError("a bug")
        return status_pb.GetRequestResponse()

    async def hang(self, request: status_pb.GetRequestRequest, context: Any) -> Any:
        await asyncio.Event().wait()  # until grpc cancels it: the caller's deadline

    async def watch(self, request: status_pb.WatchRequestRequest, context: Any) -> Any:
        self._remember()
        for _ in range(2):
            yield status_pb.WatchRequestResponse()


@contextlib.asynccontextmanager
async def probe_server(probe: Probe) -> AsyncIterator[int]:
    server = grpc.aio.server(interceptors=[metrics.GrpcServerInterceptor()])
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Get": grpc.unary_unary_rpc_method_handler(
            probe.get,
            request_deserializer=status_pb.GetRequestRequest.FromString,
            response_serializer=status_pb.GetRequestResponse.SerializeToString,
        ),
        "Hang": grpc.unary_unary_rpc_method_handler(
            probe.hang,
            request_deserializer=status_pb.GetRequestRequest.FromString,
            response_serializer=status_pb.GetRequestResponse.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            probe.watch,
            request_deserializer=status_pb.WatchRequestRequest.FromString,
            response_serializer=status_pb.WatchRequestResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def handled(method: str, code: str) -> float:
    return sample(
        "grpc_server_handled_total", grpc_service=SERVICE, grpc_method=method, grpc_code=code
    )


async def test_grpc_calls_are_counted_by_code_and_carry_the_trace_and_request_id() -> None:
    probe = Probe()
    codes = ("OK", "NotFound", "Unknown")
    before = {code: handled("Get", code) for code in codes}
    timed = sample("grpc_server_handling_seconds_count", grpc_service=SERVICE, grpc_method="Get")
    async with probe_server(probe) as port:
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=tracing.client_interceptors()
        )
        async with channel:
            get = channel.unary_unary(
                f"/{SERVICE}/Get",
                request_serializer=status_pb.GetRequestRequest.SerializeToString,
                response_deserializer=status_pb.GetRequestResponse.FromString,
            )
            await get(
                status_pb.GetRequestRequest(request_id="r-1"),
                metadata=(("traceparent", TRACEPARENT),),
                timeout=10,
            )
            for request_id, expected in (("missing", "NOT_FOUND"), ("boom", "UNKNOWN")):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await get(status_pb.GetRequestRequest(request_id=request_id), timeout=10)
                assert caught.value.code().name == expected
            # The client interceptors send the caller's current span.
            caller = tracing.TraceContext.new()
            with tracing.bound(caller):
                await get(status_pb.GetRequestRequest(), timeout=10)
            health_stub: Any = health_pb2_grpc.HealthStub(channel)  # typeshed lists no methods
            await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

    assert {code: handled("Get", code) - before[code] for code in codes} == {
        "OK": 2,
        "NotFound": 1,
        "Unknown": 1,
    }
    assert (
        sample("grpc_server_handling_seconds_count", grpc_service=SERVICE, grpc_method="Get")
        == timed + 4
    )
    first, missing, _, forwarded = probe.seen
    assert first == (TRACE_ID, "r-1")
    assert missing[0] not in (None, TRACE_ID) and missing[1] == "missing"  # a trace of its own
    assert forwarded == (caller.trace_id, None)
    assert sample("grpc_server_handled_total", grpc_service="grpc.health.v1.Health") == 0


async def test_a_server_stream_is_counted_once_when_it_ends() -> None:
    probe = Probe()
    before = handled("Watch", "OK")
    async with probe_server(probe) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        watch = ch.unary_stream(
            f"/{SERVICE}/Watch",
            request_serializer=status_pb.WatchRequestRequest.SerializeToString,
            response_deserializer=status_pb.WatchRequestResponse.FromString,
        )
        call = watch(
            status_pb.WatchRequestRequest(request_id="r-2"),
            metadata=(("traceparent", TRACEPARENT),),
            timeout=10,
        )
        assert len([update async for update in call]) == 2
    assert handled("Watch", "OK") == before + 1
    assert probe.seen == [(TRACE_ID, "r-2")]


async def test_a_call_past_its_deadline_is_counted_as_such() -> None:
    before = handled("Hang", "DeadlineExceeded")
    async with probe_server(Probe()) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        hang = ch.unary_unary(
            f"/{SERVICE}/Hang",
            request_serializer=status_pb.GetRequestRequest.SerializeToString,
            response_deserializer=status_pb.GetRequestResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await hang(status_pb.GetRequestRequest(), timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        async def counted() -> bool:
            return handled("Hang", "DeadlineExceeded") == before + 1

        await wait_until_async(counted, timeout=10, message="the server side counted")


# ---------------------------------------------------------------- HTTP


async def _status(request: web.Request) -> web.StreamResponse:
    trace = tracing.current_trace()
    if request.query.get("stream"):
        response = web.StreamResponse()
        await response.prepare(request)  # headers go out here, inside the handler
        await response.write(b"data\n")
        await response.write_eof()
        return response
    return web.json_response(
        {
            "request_id": tracing.current_request_id(),
            "trace_id": trace.trace_id if trace else None,
        }
    )


async def _moved(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther("/")


@contextlib.asynccontextmanager
async def http_server() -> AsyncIterator[str]:
    app = web.Application(middlewares=[observability.observe_middleware])
    observability.setup(app)
    app.router.add_route("*", "/status/{request_id}", _status)
    app.router.add_get("/moved", _moved)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url(""))
    finally:
        await server.close()


def requests_total(method: str, route: str, status: str) -> float:
    return sample("http_requests_total", method=method, route=route, status=status)


async def test_http_requests_are_counted_by_route_template_with_their_trace() -> None:
    route = "/status/{request_id}"
    keys = [
        ("GET", route, "200"),
        ("GET", "unmatched", "404"),
        ("other", route, "200"),
        ("GET", "/moved", "303"),
    ]
    before = {key: requests_total(*key) for key in keys}
    async with http_server() as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/status/abc", headers={"traceparent": TRACEPARENT}) as got:
            body = await got.json()
            answered = tracing.parse_traceparent(got.headers["traceparent"])
        assert body == {"request_id": "abc", "trace_id": TRACE_ID}
        assert answered is not None and answered.trace_id == TRACE_ID
        assert answered.traceparent != TRACEPARENT  # the gateway's own span

        async with http.get(f"{base}/status/xyz?stream=1") as streamed:
            assert await streamed.read() == b"data\n"
            started = tracing.parse_traceparent(streamed.headers["traceparent"])
        assert started is not None and started.trace_id != TRACE_ID  # a new trace

        for path in ("/status/1/extra", "/nothing-here"):
            async with http.get(f"{base}{path}") as missing:
                assert missing.status == 404
                assert tracing.parse_traceparent(missing.headers["traceparent"]) is not None
        async with http.request("PROPFIND", f"{base}/status/pot") as webdav:
            assert webdav.status == 200  # any method the parser accepts: one label for the rest
        async with http.get(f"{base}/moved", allow_redirects=False) as moved:
            assert moved.status == 303

    assert {key: requests_total(*key) - before[key] for key in keys} == {
        ("GET", route, "200"): 2,
        ("GET", "unmatched", "404"): 2,
        ("other", route, "200"): 1,
        ("GET", "/moved", "303"): 1,
    }
    assert REGISTRY.get_sample_value(
        "http_request_duration_seconds_count", {"method": "GET", "route": route}
    )


# ---------------------------------------------------------------- settings and labels


def test_metrics_listen_is_optional_checked_and_never_the_api_port() -> None:
    base = {"IMGPIPE_DATABASE_URL": "postgresql://db/x", "IMGPIPE_REDIS_URL": "redis://r"}
    assert IngestSettings.from_env(base).common.metrics_listen == ""
    assert GatewaySettings.from_env({}).metrics_listen == ""
    listen = {"IMGPIPE_METRICS_LISTEN": "0.0.0.0:9464"}
    assert IngestSettings.from_env(base | listen).common.metrics_listen == "0.0.0.0:9464"
    assert GatewaySettings.from_env(listen).metrics_listen == "0.0.0.0:9464"
    for bad in ("9464", "host:port", "127.0.0.1:0", "127.0.0.1:50051"):
        with pytest.raises(ConfigError) as caught:
            IngestSettings.from_env(base | {"IMGPIPE_METRICS_LISTEN": bad})
        assert caught.value.problems[0].startswith("IMGPIPE_METRICS_LISTEN")
    with pytest.raises(ConfigError, match="IMGPIPE_HTTP_LISTEN"):
        GatewaySettings.from_env({"IMGPIPE_METRICS_LISTEN": "127.0.0.1:8080"})


def test_make_run_gives_each_child_a_metrics_port_of_its_own(tmp_path: Path) -> None:
    off = plan_stack({"IMGPIPE_METRICS_LISTEN": "127.0.0.1:9464"}, cwd=tmp_path)
    assert all("IMGPIPE_METRICS_LISTEN" not in child.env for child in off.children)
    for child in off.children:
        env = off.child_env(child, database_url="postgresql://x", redis_url="redis://x")
        assert "IMGPIPE_METRICS_LISTEN" not in env

    plan = plan_stack(
        {"IMGPIPE_DEV_METRICS_BASE_PORT": "19400", "IMGPIPE_DEV_WORKERS": "2"}, cwd=tmp_path
    )
    given = {child.name: child.env["IMGPIPE_METRICS_LISTEN"] for child in plan.children}
    assert given == {name: f"127.0.0.1:{port}" for name, port in metrics_ports(19400, 2).items()}
    assert given == {
        "ingest": "127.0.0.1:19400",
        "status": "127.0.0.1:19401",
        "gateway": "127.0.0.1:19402",
        "worker-1": "127.0.0.1:19410",
        "worker-2": "127.0.0.1:19411",
    }


@pytest.mark.parametrize(
    ("code", "result"),
    [
        (OutcomeCode.TIMEOUT, "timeout"),
        (OutcomeCode.CONNECTION, "connection"),
        (OutcomeCode.BLOCKED_ADDRESS, "blocked"),
        (OutcomeCode.TOO_LARGE, "error"),
    ],
)
def test_webhook_failures_have_a_bounded_result_label(code: OutcomeCode, result: str) -> None:
    outcome = _failure_outcome(ImageFailure(code, "what happened"))
    assert outcome.result == result and result in metrics.WEBHOOK_RESULTS


def test_grpc_code_names_are_the_ones_dashboards_use() -> None:
    assert metrics._CODE_NAMES[grpc.StatusCode.DEADLINE_EXCEEDED] == "DeadlineExceeded"
    assert metrics._CODE_NAMES[grpc.StatusCode.CANCELLED] == "Canceled"
    assert metrics._code_name(None, asyncio.CancelledError()) == "Canceled"
