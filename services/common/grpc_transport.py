"""How imgpipe's gRPC servers listen and its clients dial: TLS or mTLS, and connection age.

The one place where server options, listening ports and client channels are built, so every
service and the gateway agree on them (docs/grpc.md). Settings come from the environment
(services.common.config.read_grpc_transport); without any, servers listen in plaintext and
clients dial in plaintext, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

# Longer than the longest live-progress stream (WatchRequest ends itself after 10 min,
# config.MAX_WATCH_SECONDS): a stream that is open when its connection reaches its age ends
# on its own terms, and the client reconnects on a new connection, as it does every 10 min.
DEFAULT_MAX_CONNECTION_AGE = 300.0
DEFAULT_MAX_CONNECTION_AGE_GRACE = 630.0

ChannelOption = tuple[str, Any]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files. A server with `cert` and `key` serves TLS; with `ca` too, it requires
    client certificates signed by `ca` (mTLS). A client dials TLS when any is set: `ca`
    verifies the server (the system's roots without it), `cert` and `key` are its own
    certificate for mTLS. `server_name` overrides the name checked in the server's
    certificate (for addresses that are not the name it was issued for)."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    server_name: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca)


@dataclass(frozen=True, slots=True)
class GrpcTransport:
    """TLS files and connection lifetimes of one process's gRPC servers and channels."""

    tls: TlsFiles = field(default_factory=TlsFiles)
    # Seconds before a server asks a client to reconnect (GOAWAY; gRPC adds ±10 % jitter), so
    # round robin over a headless Service's addresses reaches pods started since.
    max_connection_age: float = DEFAULT_MAX_CONNECTION_AGE
    # Seconds calls in flight on such a connection still have before it is closed.
    max_connection_age_grace: float = DEFAULT_MAX_CONNECTION_AGE_GRACE
    # host:port of a plaintext listener serving grpc.health.v1 alone (servers only; '' none):
    # kubelet's native gRPC probes cannot speak TLS.
    health_listen: str = ""

    def server_options(self) -> list[ChannelOption]:
        return [
            ("grpc.max_connection_age_ms", _ms(self.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace)),
            # gRPC sets SO_REUSEPORT by default: a second server on a port in use would start
            # without a word and take part of the first one's new connections (measured: two
            # processes both bound one port). Without it, the second one fails to listen.
            ("grpc.so_reuseport", 0),
        ]

    def server(self, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
        """A server with these options; `listen()` adds its port."""
        return grpc.aio.server(interceptors=list(interceptors), options=self.server_options())

    def listen(self, server: grpc.aio.Server, address: str) -> int:
        """Add `address` to `server`, with TLS when a certificate is set; return the port."""
        try:
            if self.tls.cert:
                port = server.add_secure_port(address, self.server_credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:  # newer grpcio raises where older versions return 0
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {address}: is something else listening there?")
        return port

    def health_server(self, servicer: Any) -> grpc.aio.Server | None:
        """A plaintext server of the health `servicer` alone on `health_listen`, if set."""
        if not self.health_listen:
            return None
        server = grpc.aio.server(options=self.server_options())
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        GrpcTransport().listen(server, self.health_listen)  # plaintext, whatever self's TLS
        return server

    def server_credentials(self) -> grpc.ServerCredentials:
        ca = _read(self.tls.ca) if self.tls.ca else None
        return grpc.ssl_server_credentials(
            [(_read(self.tls.key), _read(self.tls.cert))],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def channel(
        self,
        target: str,
        *,
        options: Sequence[ChannelOption] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> grpc.aio.Channel:
        """A channel to `target`: TLS (and a client certificate) when configured."""
        if not self.tls.enabled:
            return grpc.aio.insecure_channel(
                target, options=list(options), interceptors=list(interceptors)
            )
        options = list(options)
        if self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return grpc.aio.secure_channel(
            target, self.channel_credentials(), options=options, interceptors=list(interceptors)
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls.ca) if self.tls.ca else None,
            private_key=_read(self.tls.key) if self.tls.key else None,
            certificate_chain=_read(self.tls.cert) if self.tls.cert else None,
        )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _read(path: str) -> bytes:
    # Read when a server or channel is built, at start: a rotated certificate takes a restart.
    return Path(path).read_bytes()
