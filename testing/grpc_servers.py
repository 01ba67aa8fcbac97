"""An in-process gRPC server on 127.0.0.1 for a test: its address while the block runs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import grpc


@contextlib.asynccontextmanager
async def on_loopback(
    register: Callable[[grpc.aio.Server], None],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> AsyncIterator[str]:
    """Serve what `register` adds on a free port of 127.0.0.1; yields "127.0.0.1:<port>" and
    stops the server after the block."""
    server = grpc.aio.server(interceptors=interceptors)
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
