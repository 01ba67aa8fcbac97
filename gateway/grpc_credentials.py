"""The caller's credential on every gRPC call the gateway makes while answering that caller.

`forwarding_interceptors()` go on the gateway's gRPC channels (gateway/grpc_backends.py): every
call made while answering a request carries that request's credential as `authorization`
metadata (`Bearer <key>` or `Session <id>`). Ingest and status check it again, record and
filter by its owner, and apply the limits. Handlers never pass it themselves, so no route can
forget to: the auth middleware sets it for the request (`forwarding`), and the session client
sets it for its own calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import grpc

from services.common.grpc_client import rewriting_interceptors

# The `authorization` value of the HTTP request being answered, for the gRPC calls made while
# answering it.
_forwarded: ContextVar[str | None] = ContextVar("imgpipe_forwarded_credential", default=None)


@contextlib.contextmanager
def forwarding(authorization: str | None) -> Iterator[None]:
    """gRPC calls made inside carry `authorization` (none when it is None)."""
    token = _forwarded.set(authorization)
    try:
        yield
    finally:
        _forwarded.reset(token)


def _with_credential(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    value = _forwarded.get()
    if value is None:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add("authorization", value)
    replaced: grpc.aio.ClientCallDetails = details._replace(metadata=metadata)  # type: ignore[attr-defined]
    return replaced


def forwarding_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add the caller's credential to every gRPC call of the gateway."""
    return rewriting_interceptors(_with_credential)
