"""Client interceptors that rewrite every outgoing call's details (its metadata, mostly).

The gateway adds the caller's credential (gateway.grpc_credentials) and the trace context
(services.common.tracing) to each call this way, so no handler has to remember to.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

import grpc

Rewrite = Callable[[grpc.aio.ClientCallDetails], grpc.aio.ClientCallDetails]
Continuation = Callable[[grpc.aio.ClientCallDetails, Any], Any]
Requests = AsyncIterable[Any] | Iterable[Any] | None


def rewriting_interceptors(rewrite: Rewrite) -> list[grpc.aio.ClientInterceptor]:
    """One interceptor per call shape (grpc.aio wants them separately), all applying `rewrite`."""

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(
            self, continuation: Continuation, details: grpc.aio.ClientCallDetails, request: Any
        ) -> Any:
            return await continuation(rewrite(details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(
            self, continuation: Continuation, details: grpc.aio.ClientCallDetails, request: Any
        ) -> Any:
            return await continuation(rewrite(details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(
            self,
            continuation: Continuation,
            details: grpc.aio.ClientCallDetails,
            requests: Requests,
        ) -> Any:
            return await continuation(rewrite(details), requests)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(
            self,
            continuation: Continuation,
            details: grpc.aio.ClientCallDetails,
            requests: Requests,
        ) -> Any:
            return await continuation(rewrite(details), requests)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
