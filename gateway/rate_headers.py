"""RateLimit-* headers on every answer that charged the caller's API key.

The call rate is counted where it is enforced, in the ingest and status services (a GCRA bucket
in Redis: services/common/limits.py), which send the key's quota as initial metadata of each
call (services/common/auth.py). Here a client interceptor keeps what each call of a request
reports, and the answer carries the lowest remaining of them in the fields of
draft-ietf-httpapi-ratelimit-headers-07, section 3
(https://datatracker.ietf.org/doc/html/draft-ietf-httpapi-ratelimit-headers-07):

    RateLimit-Limit: 40            calls at once (the key's burst)
    RateLimit-Remaining: 37        of them left now
    RateLimit-Reset: 1             seconds until all are back
    RateLimit-Policy: 40;w=2       the burst, and the seconds a full burst takes to refill

A 429 for the rate carries them too (Remaining 0), beside Retry-After. Without API keys
nothing is limited and nothing is added.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, cast

import grpc
from aiohttp import web

from gateway.http_errors import Handler
from services.common.auth import QUOTA_METADATA, Quota

# How long an answer waits for a call's quota it has not read yet (a call that is over sends
# its metadata first, so this is only ever a scheduling delay).
_READ_TIMEOUT = 1.0


class _Quotas:
    """The quotas the gRPC calls made for one HTTP request reported, as they come in."""

    def __init__(self) -> None:
        self.readers: list[asyncio.Task[None]] = []
        self.seen: list[Quota] = []

    def lowest(self) -> Quota | None:
        return min(self.seen, key=lambda quota: quota.remaining, default=None)


_quotas: ContextVar[_Quotas | None] = ContextVar("imgpipe_quotas", default=None)


@web.middleware
async def quota_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    # aiohttp answers each request in a task of its own: the calls it makes see this holder.
    quotas = _Quotas()
    _quotas.set(quotas)
    try:
        return await handler(request)
    finally:
        for reader in quotas.readers:
            reader.cancel()


async def add_ratelimit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the RateLimit-* fields of the lowest quota the request's calls
    reported."""
    quotas = _quotas.get()
    if quotas is None:
        return
    pending = [reader for reader in quotas.readers if not reader.done()]
    if pending:
        await asyncio.wait(pending, timeout=_READ_TIMEOUT)
    quota = quotas.lowest()
    if quota is not None:
        response.headers["RateLimit-Limit"] = str(quota.limit)
        response.headers["RateLimit-Remaining"] = str(quota.remaining)
        response.headers["RateLimit-Reset"] = str(quota.reset)
        response.headers["RateLimit-Policy"] = f"{quota.limit};w={quota.window}"


async def _read(call: Any, quotas: _Quotas) -> None:
    with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
        for key, value in await call.initial_metadata() or ():
            if key == QUOTA_METADATA:
                quota = Quota.parse(str(value))
                if quota is not None:
                    quotas.seen.append(quota)


def _watch(call: Any) -> Any:
    # A reader per call, so a client-streaming call (UploadCsv) is never waited on here.
    quotas = _quotas.get()
    if quotas is not None:
        quotas.readers.append(asyncio.ensure_future(_read(call, quotas)))
    return call


Continuation = Callable[[grpc.aio.ClientCallDetails, Any], Any]


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: Continuation, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return _watch(await continuation(details, request))


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: Continuation, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return _watch(await continuation(details, request))


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self, continuation: Continuation, details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return _watch(await continuation(details, requests))


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that read each call's quota for the HTTP request it is made for."""
    return cast(list[grpc.aio.ClientInterceptor], [_UnaryUnary(), _UnaryStream(), _StreamUnary()])


def setup(app: web.Application) -> None:
    app.on_response_prepare.append(add_ratelimit_headers)
