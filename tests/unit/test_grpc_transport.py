"""gRPC transport (services/common/grpc_transport.py): connections recycled at their age while
streams outlive it, TLS, mTLS refusing clients without a good certificate, and the settings.

Real servers and channels on 127.0.0.1; certificates made by openssl at test time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.config import GatewaySettings
from services.common.config import MAX_WATCH_SECONDS, ConfigError
from services.common.grpc_server import run_service
from services.common.grpc_transport import GrpcTransport, TlsFiles
from services.status.config import StatusSettings
from testing.certs import Authority, Leaf
from testing.polling import wait_until_async
from testing.ports import free_tcp_port

pytestmark = pytest.mark.unit

SERVICE = "test.Probe"


@dataclass
class Probe:
    """`Peer` answers with the caller's connection (its address and port); `Stream` sends the
    connection it runs on, then one message per item put on `items`."""

    items: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    client_names: list[bytes] = field(default_factory=list)

    async def peer(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        names = context.auth_context().get("x509_common_name") or []
        self.client_names.extend(names)
        return context.peer().encode()

    async def stream(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        yield context.peer().encode()
        while True:
            yield await self.items.get()

    def register(self, server: grpc.aio.Server) -> None:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Peer": grpc.unary_unary_rpc_method_handler(self.peer),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@contextlib.asynccontextmanager
async def serving(transport: GrpcTransport) -> AsyncIterator[tuple[str, Probe]]:
    probe = Probe()
    server = transport.server()
    probe.register(server)
    port = transport.listen(server, "127.0.0.1:0")
    await server.start()
    try:
        yield f"localhost:{port}", probe
    finally:
        await server.stop(None)


async def peer_of(channel: grpc.aio.Channel) -> bytes:
    peer: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(f"/{SERVICE}/Peer")
    return await peer(b"", timeout=5)


def streamer(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
    return channel.unary_stream(f"/{SERVICE}/Stream")


async def test_connections_are_recycled_at_their_age_and_streams_outlive_it() -> None:
    transport = GrpcTransport(max_connection_age=0.3, max_connection_age_grace=60)
    async with serving(transport) as (target, probe), transport.channel(target) as channel:
        first = await peer_of(channel)
        stream = streamer(channel)(b"", timeout=60)
        assert await stream.read() == first  # the stream runs on the first connection

        # The server sends GOAWAY at the connection's age; the client dials again, and every
        # call meanwhile succeeds (peer_of raises otherwise).
        async def on_new_connection() -> bytes | None:
            peer = await peer_of(channel)
            return peer if peer != first else None

        second = await wait_until_async(on_new_connection, message="a new connection")

        # Within the grace, the stream opened before still gets its messages.
        probe.items.put_nowait(b"after GOAWAY")
        assert await stream.read() == b"after GOAWAY"
        assert second != first
        stream.cancel()


async def test_a_stream_past_the_grace_ends_and_the_client_reconnects() -> None:
    transport = GrpcTransport(max_connection_age=0.3, max_connection_age_grace=0.5)
    async with serving(transport) as (target, _), transport.channel(target) as channel:
        watch = streamer(channel)
        first_call = watch(b"", timeout=30)
        first = await first_call.read()
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await first_call.read()  # nothing more comes: the connection is closed under it
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE

        # As the gateway's watchers do: open the stream again, on a new connection.
        again = watch(b"", timeout=30)
        assert await again.read() not in (first, grpc.aio.EOF)
        again.cancel()


def test_server_options_carry_the_age_and_grace_in_milliseconds() -> None:
    options = dict(
        GrpcTransport(max_connection_age=2.5, max_connection_age_grace=630).server_options()
    )
    assert options == {
        "grpc.max_connection_age_ms": 2500,
        "grpc.max_connection_age_grace_ms": 630_000,
        "grpc.so_reuseport": 0,
    }
    # The default grace outlasts the longest WatchRequest stream.
    assert GrpcTransport().max_connection_age_grace > MAX_WATCH_SECONDS


async def test_a_second_server_on_a_port_in_use_fails_to_listen() -> None:
    """gRPC's default SO_REUSEPORT would let it bind and take part of the first one's new
    connections; both servers are of this transport, in one process as in two."""
    transport = GrpcTransport()
    async with serving(transport) as (target, _):
        port = target.rsplit(":", 1)[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            transport.listen(transport.server(), f"127.0.0.1:{port}")
        probes = replace(transport, health_listen=f"127.0.0.1:{port}")
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            probes.health_server(health.aio.HealthServicer())


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Leaf
    client: Leaf
    stranger: Leaf  # signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority.create(folder)
    other = Authority.create(folder, "other-ca")
    return Pki(ca, ca.issue("server"), ca.issue("client"), other.issue("stranger"))


def tls(leaf: Leaf | None = None, ca: Path | None = None) -> GrpcTransport:
    return GrpcTransport(
        tls=TlsFiles(
            cert=str(leaf.cert) if leaf else "",
            key=str(leaf.key) if leaf else "",
            ca=str(ca) if ca else "",
        )
    )


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await peer_of(channel)
    return error.value.code()


async def test_tls_serves_clients_that_trust_its_ca_and_only_over_tls(pki: Pki) -> None:
    async with serving(tls(pki.server)) as (target, probe):
        async with tls(ca=pki.ca.cert).channel(target) as channel:
            assert (await peer_of(channel)).startswith(b"ipv4:127.0.0.1:")
        assert probe.client_names == []  # no client certificate asked for
        async with grpc.aio.insecure_channel(target) as plaintext:
            assert await refused(plaintext) == grpc.StatusCode.UNAVAILABLE
        async with tls(ca=pki.stranger.cert).channel(target) as untrusting:
            assert await refused(untrusting) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_requires_a_client_certificate_from_its_ca(pki: Pki) -> None:
    async with serving(tls(pki.server, pki.ca.cert)) as (target, probe):
        async with tls(pki.client, pki.ca.cert).channel(target) as channel:
            await peer_of(channel)
        assert probe.client_names == [b"client"]
        async with tls(ca=pki.ca.cert).channel(target) as anonymous:
            assert await refused(anonymous) == grpc.StatusCode.UNAVAILABLE
        async with tls(pki.stranger, pki.ca.cert).channel(target) as stranger:
            assert await refused(stranger) == grpc.StatusCode.UNAVAILABLE
        assert probe.client_names == [b"client"]


async def check(channel: grpc.aio.Channel) -> int:
    health: Any = health_pb2_grpc.HealthStub(channel)  # typeshed lists no methods
    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
    return int(answer.status)


async def test_run_service_serves_over_mtls_and_health_alone_in_plaintext(pki: Pki) -> None:
    """With TLS, kubelet's gRPC probes (plaintext only) get a port with health alone."""
    stop = asyncio.Event()
    port, probe_port = free_tcp_port(), free_tcp_port()
    transport = replace(tls(pki.server, pki.ca.cert), health_listen=f"127.0.0.1:{probe_port}")
    service = asyncio.create_task(
        run_service(
            listen=f"127.0.0.1:{port}",
            register=Probe().register,
            stop=stop,
            grace=1,
            transport=transport,
        )
    )
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        target = f"localhost:{port}"
        async with tls(pki.client, pki.ca.cert).channel(target) as channel:

            async def up() -> bool:
                return await check(channel) == serving

            await wait_until_async(up, message="SERVING", ignore=(grpc.aio.AioRpcError,))
            assert (await peer_of(channel)).startswith(b"ipv4:127.0.0.1:")
        async with grpc.aio.insecure_channel(target) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError):
                await check(plaintext)

        async with grpc.aio.insecure_channel(f"127.0.0.1:{probe_port}") as probes:
            assert await check(probes) == serving
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await peer_of(probes)  # the API is not served there
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        stop.set()
        await asyncio.wait_for(service, timeout=10)


BACKEND_ENV = {"IMGPIPE_DATABASE_URL": "postgresql://x/y", "IMGPIPE_REDIS_URL": "redis://x"}


def test_settings_read_tls_paths_and_connection_age(pki: Pki) -> None:
    env = {
        **BACKEND_ENV,
        "IMGPIPE_GRPC_TLS_CERT": str(pki.server.cert),
        "IMGPIPE_GRPC_TLS_KEY": str(pki.server.key),
        "IMGPIPE_GRPC_TLS_CA": str(pki.ca.cert),
        "IMGPIPE_GRPC_MAX_CONNECTION_AGE": "120",
        "IMGPIPE_GRPC_MAX_CONNECTION_AGE_GRACE": "700",
    }
    grpc_settings = StatusSettings.from_env(env).common.grpc
    assert grpc_settings == GrpcTransport(
        TlsFiles(str(pki.server.cert), str(pki.server.key), str(pki.ca.cert)), 120, 700
    )
    # The gateway is a client only: a CA alone makes it dial TLS and verify the servers.
    gateway = GatewaySettings.from_env({"IMGPIPE_GRPC_TLS_CA": str(pki.ca.cert)}).grpc
    assert gateway.tls.enabled and not gateway.tls.cert
    assert not StatusSettings.from_env(BACKEND_ENV).common.grpc.tls.enabled


def test_settings_list_every_tls_mistake(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError) as error:
        StatusSettings.from_env(
            {
                **BACKEND_ENV,
                "IMGPIPE_GRPC_TLS_CERT": str(tmp_path / "missing.pem"),
                "IMGPIPE_GRPC_MAX_CONNECTION_AGE": "0",
            }
        )
    problems = "\n".join(error.value.problems)
    assert "IMGPIPE_GRPC_TLS_CERT=" in problems and "no such file" in problems
    assert "IMGPIPE_GRPC_TLS_CERT and IMGPIPE_GRPC_TLS_KEY go together" in problems
    assert "IMGPIPE_GRPC_MAX_CONNECTION_AGE=" in problems
    # The probes' port is a port of its own.
    own_port = "uses the port of IMGPIPE_GRPC_LISTEN"
    with pytest.raises(ConfigError, match=own_port):
        StatusSettings.from_env({**BACKEND_ENV, "IMGPIPE_GRPC_HEALTH_LISTEN": "127.0.0.1:50052"})
    # A server with a CA but no certificate of its own cannot require client certificates.
    with pytest.raises(ConfigError, match="IMGPIPE_GRPC_TLS_CA makes a server"):
        StatusSettings.from_env({**BACKEND_ENV, "IMGPIPE_GRPC_TLS_CA": str(pki.ca.cert)})
