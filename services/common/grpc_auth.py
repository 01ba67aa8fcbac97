"""The service side of API keys: `ApiKeyInterceptor` and the caller of the current gRPC call.

gRPC services authenticate every call but health and reflection in `ApiKeyInterceptor`, which
also applies the call-rate limit and makes the caller available to servicers (`caller_owner`).
A call authenticates with `authorization: Bearer <key>`, or with `authorization: Session <id>`
for a browser's session (services/common/sessions.py). The keys themselves, and what the
gateway shares of them, are in services/common/auth.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from services.common import initial_metadata
from services.common.auth import (
    QUOTA_METADATA,
    KeyRing,
    Principal,
    Quota,
    bearer_token,
    session_token,
)
from services.common.errors import ImgpipeError, Unauthenticated, Unavailable, grpc_abort
from services.common.grpc_handlers import WrappingInterceptor, behavior_of, with_behavior
from services.common.servicer_errors import BACKEND_ERRORS

log = logging.getLogger(__name__)


# Set by ApiKeyInterceptor for the duration of each call; None when authentication is off.
_caller: ContextVar[Principal | None] = ContextVar("imgpipe_caller", default=None)


def caller() -> Principal | None:
    """The authenticated caller of the current gRPC call (None when authentication is off)."""
    return _caller.get()


def caller_owner() -> str:
    """The owner of the current call: the key's name, or '' when authentication is off."""
    principal = _caller.get()
    return principal.name if principal is not None else ""


@dataclass(frozen=True, slots=True)
class Credential:
    """What the current call authenticated with: an API key (its SHA-256) or a session."""

    key_digest: bytes | None = None
    session_id: str | None = None


# Set by ApiKeyInterceptor with the caller; None when authentication is off.
_credential: ContextVar[Credential | None] = ContextVar("imgpipe_credential", default=None)


def caller_credential() -> Credential | None:
    return _credential.get()


# Limiter.check_rate: charges the call, tells `report` the quota, raises RateLimited over it.
RateCheck = Callable[[Principal, Callable[[Quota], Awaitable[None]]], Awaitable[None]]
# A session id → the principal it acts for, or None (services/common/sessions.py).
SessionResolver = Callable[[str], Awaitable[Principal | None]]


class ApiKeyInterceptor(WrappingInterceptor):
    """Authenticates every call (but health and reflection) from its `authorization: Bearer`
    metadata, applies the caller's rate limit, and sets the caller for the servicer.

    The check runs inside the wrapped handler rather than in `intercept_service`, so a refusal
    goes out through the call's own context with its `google.rpc` details (RetryInfo).
    """

    def __init__(
        self,
        keys: KeyRing,
        check_rate: RateCheck | None = None,
        sessions: SessionResolver | None = None,
    ) -> None:
        self.keys = keys
        self.check_rate = check_rate
        self.sessions = sessions

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Health checks and reflection (PROBE_METHODS) answer without a key."""
        return _guarded(handler, self._admit)

    async def _admit(
        self, context: grpc.aio.ServicerContext[Any, Any], uploading: bool
    ) -> Principal | None:
        if not self.keys.enabled:
            return None
        metadata = context.invocation_metadata() or ()
        values = [str(value) for key, value in metadata if key == "authorization"]
        token = bearer_token(values[0]) if values else None
        session_id = session_token(values[0]) if values else None
        if session_id is not None and self.sessions is not None:
            principal = await self.sessions(session_id)
            if principal is None:
                raise Unauthenticated(
                    "the session has ended (expired, signed out, or its key was removed):"
                    " sign in again",
                    key_given=True,
                )
            _credential.set(Credential(session_id=session_id))
        elif token is None:
            raise Unauthenticated(
                "an API key is required: send the metadata `authorization: Bearer <key>`"
            )
        else:
            principal = self.keys.authenticate(token)
            if principal is None:
                raise Unauthenticated("the API key is not valid", key_given=True)
            _credential.set(Credential(key_digest=hashlib.sha256(token.encode()).digest()))
        if self.check_rate is not None:

            async def report(quota: Quota) -> None:
                # Before the answer or the refusal: the gateway turns it into RateLimit-* headers.
                # An upload sends it when ingest is ready for the file (initial_metadata.py).
                initial_metadata.owe((QUOTA_METADATA, quota.metadata()))

            await self.check_rate(principal, report)
            if not uploading:
                await initial_metadata.settle(context)
        return principal


# Authenticates and charges a call: (context, whether the client streams its requests).
Admit = Callable[[Any, bool], Awaitable[Principal | None]]
# A refused client-streaming call (an upload) reads its first message (the header) before it
# answers, waiting this long at most: the client's write of it is then over, so the refusal
# cannot arrive while that write is in flight (grpc/grpc#36066, initial_metadata.py).
FIRST_MESSAGE_WAIT = 1.0


async def _enter(admit: Admit, context: Any, requests: AsyncIterator[Any] | None) -> None:
    """Admit the call or end it; `requests` is the request stream of a client-streaming call."""
    try:
        principal = await admit(context, requests is not None)
    except ImgpipeError as exc:
        await _first_message(requests)
        await grpc_abort(context, exc)
    except BACKEND_ERRORS as exc:
        log.warning("backend unavailable while authenticating", extra={"error": repr(exc)})
        await _first_message(requests)
        await grpc_abort(context, Unavailable("a backend is unavailable; retry later"))
    # Each call runs in a task of its own, so this value is seen by this call alone.
    _caller.set(principal)


async def _first_message(requests: AsyncIterator[Any] | None) -> None:
    if requests is not None:
        # Whatever it is, or none within the wait: the call is refused either way.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(anext(aiter(requests), None), FIRST_MESSAGE_WAIT)


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], admit: Admit
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with `admit` run first, for any of the four kinds of method."""
    h: Any = handler
    behavior = behavior_of(handler)
    wrapped: Callable[..., Any]
    if h.response_streaming:

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            await _enter(admit, context, request if h.request_streaming else None)
            async for item in behavior(request, context):
                yield item

        wrapped = streaming
    else:

        async def unary(request: Any, context: Any) -> Any:
            await _enter(admit, context, request if h.request_streaming else None)
            return await behavior(request, context)

        wrapped = unary
    return with_behavior(handler, wrapped)
