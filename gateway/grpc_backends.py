"""The gateway's gRPC channels to ingest and status, and the stubs the handlers call.

`open_channels(settings)` opens them and closes them in reverse order when it exits; the
application enters it while it runs (gateway/app.py), and nothing is opened at import time.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from gateway import rate_headers
from gateway.config import GatewaySettings
from gateway.grpc_credentials import forwarding_interceptors
from services.common import tracing
from services.common.pb.imgpipe.v1 import (
    ingest_service_pb2_grpc as ingest_grpc,
)
from services.common.pb.imgpipe.v1 import (
    session_service_pb2_grpc as session_grpc,
)
from services.common.pb.imgpipe.v1 import (
    status_service_pb2_grpc as status_grpc,
)

log = logging.getLogger(__name__)

# A page of 1000 products with many image URLs can pass gRPC's default 4 MiB receive limit.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Calls spread over every address the name resolves to. Behind a headless Kubernetes
    # Service (deploy/k8s) that is every ingest or status pod; with one address it is a no-op.
    ("grpc.lb_policy_name", "round_robin"),
]
# Channels are closed after in-flight calls had this long to finish.
_CHANNEL_CLOSE_GRACE = 5.0


@dataclass(frozen=True, slots=True)
class Channels:
    """The stubs the handlers call, over one channel to ingest and one to status."""

    ingest: ingest_grpc.IngestServiceAsyncStub
    status: status_grpc.StatusServiceAsyncStub
    sessions: session_grpc.SessionServiceAsyncStub  # served by status
    # grpc_health ships no type information.
    ingest_health: Any
    status_health: Any


@asynccontextmanager
async def open_channels(settings: GatewaySettings) -> AsyncIterator[Channels]:
    """The channels to ingest and status, closed on exit."""
    async with AsyncExitStack() as stack:
        # Every call carries the key (gateway/grpc_credentials.py) and the trace context
        # (services/common/tracing.py) of the HTTP request it is made for, and reports the key's
        # quota back to it (gateway/rate_headers.py).
        ingest_channel = settings.grpc.channel(
            settings.ingest_addr, options=CHANNEL_OPTIONS, interceptors=_interceptors()
        )
        stack.push_async_callback(ingest_channel.close, _CHANNEL_CLOSE_GRACE)
        status_channel = settings.grpc.channel(
            settings.status_addr, options=CHANNEL_OPTIONS, interceptors=_interceptors()
        )
        stack.push_async_callback(status_channel.close, _CHANNEL_CLOSE_GRACE)
        channels = Channels(
            ingest=ingest_grpc.IngestServiceStub(ingest_channel),
            status=status_grpc.StatusServiceStub(status_channel),
            sessions=session_grpc.SessionServiceStub(status_channel),
            ingest_health=health_pb2_grpc.HealthStub(ingest_channel),
            status_health=health_pb2_grpc.HealthStub(status_channel),
        )
        log.info(
            "backends configured",
            extra={"ingest": settings.ingest_addr, "status": settings.status_addr},
        )
        yield channels


def _interceptors() -> list[grpc.aio.ClientInterceptor]:
    return [
        *forwarding_interceptors(),
        *tracing.client_interceptors(),
        *rate_headers.client_interceptors(),
    ]
