"""Server method handlers with their behaviour wrapped (for server interceptors).

grpc.aio has four handler kinds; an interceptor that runs code around a call takes the
handler's behaviour, wraps it, and builds a handler of the same kind around the wrapper. The
auth interceptor (services.common.grpc_auth) and the metrics one (services.common.metrics) do
this, as WrappingInterceptors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

_MAKERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def behavior_of(handler: grpc.RpcMethodHandler[Any, Any]) -> Callable[..., Any]:
    """The servicer method behind `handler`, whichever of the four kinds it is."""
    h: Any = handler
    behavior: Callable[..., Any] = (
        h.unary_unary or h.unary_stream or h.stream_unary or h.stream_stream
    )
    return behavior


def with_behavior(
    handler: grpc.RpcMethodHandler[Any, Any], behavior: Callable[..., Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of `handler`'s kind and (de)serialisers that runs `behavior` instead."""
    h: Any = handler
    make = _MAKERS[(h.request_streaming, h.response_streaming)]
    return make(
        behavior,
        request_deserializer=h.request_deserializer,
        response_serializer=h.response_serializer,
    )


# Health checks and reflection: probes and tools call them, so interceptors leave them alone.
PROBE_METHODS = ("/grpc.health.", "/grpc.reflection.")
# A string: typeshed's handler type is generic, grpc's class is not subscriptable at run time.
Continuation: TypeAlias = (
    "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"
)


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps the handler of every method but the probes' (`wrap`)."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(PROBE_METHODS):
            return handler
        return self.wrap(handler, method)

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        raise NotImplementedError
