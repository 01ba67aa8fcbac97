"""When a call sends its initial metadata, and the signal an upload's client waits for.

A gRPC call sends its initial metadata once. Unary calls send it as soon as `ApiKeyInterceptor`
has charged the caller, with the key's quota in it (gateway/rate_headers.py reads it). A
client-streaming call (an upload) holds the quota back and sends it with `UPLOAD_READY` when
ingest is ready to read the file: the key, the rate, the options and the `uploads=` lease have
all been checked by then.

The gateway writes nothing but the header until it sees `UPLOAD_READY`. An asyncio gRPC client
whose write is still in flight when the server ends the call reports INTERNAL instead of the
server's status (grpc/grpc#36066), so a refusal that arrived while the gateway streamed the file
used to reach the HTTP caller as a 500. After `UPLOAD_READY`, ingest reads the file to its end
before it answers (services/ingest/spool.py), so no answer can overtake a write.

A call that is refused before it is ready still sends what it owes: `errors.grpc_abort` settles
it first, so a 429 carries the quota too.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import grpc

# Initial metadata key: ingest is ready to read the upload's file.
UPLOAD_READY = "imgpipe-upload-ready"

Metadata = tuple[tuple[str, str], ...]

# Each call runs in a task of its own, so this is the current call's debt alone.
_owed: ContextVar[Metadata | None] = ContextVar("imgpipe_owed_metadata", default=None)


def owe(*metadata: tuple[str, str]) -> None:
    """Keep `metadata` for this call's initial metadata, to be sent by `send` or `settle`."""
    _owed.set((*(_owed.get() or ()), *metadata))


async def send(context: grpc.aio.ServicerContext[Any, Any], *metadata: tuple[str, str]) -> None:
    """Send this call's initial metadata now: what it owes, then `metadata`."""
    owed = _owed.get() or ()
    _owed.set(None)
    await context.send_initial_metadata((*owed, *metadata))


async def settle(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Send what this call owes, if anything (before its status, or never)."""
    if _owed.get() is not None:
        await send(context)


async def ready(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Tell the client of an upload that its file will be read to the end: write it now."""
    await send(context, (UPLOAD_READY, "1"))


def is_ready(metadata: Any) -> bool:
    """Whether an upload call's initial metadata (None or pairs) says to write the file."""
    return any(key == UPLOAD_READY for key, _ in metadata or ())
