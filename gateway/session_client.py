"""The gateway's client of the status service's SessionService: the web page's sign-ins.

It remembers which session ids the status service said were live lately, so a browser's
requests do not each cost a call (the services check every call again anyway).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import grpc

from gateway.grpc_credentials import forwarding
from gateway.http_credentials import Credential
from services.common.errors import error_from_rpc
from services.common.pb.imgpipe.v1 import session_service_pb2 as session_pb
from services.common.pb.imgpipe.v1 import session_service_pb2_grpc as session_grpc
from services.common.session_ids import CACHE_SECONDS, session_hash

_SESSIONS_REMEMBERED = 4096


class SessionClient:
    """The status service's SessionService, and which session ids it said were live lately.

    Only live answers are remembered, for CACHE_SECONDS: the services check every call again,
    so this only spares them a call per request; a sign-out takes effect within that time.
    """

    def __init__(self, rpc_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpc_timeout = rpc_timeout
        self._stub: session_grpc.SessionServiceAsyncStub | None = None
        self._clock = clock
        self._live: OrderedDict[bytes, float] = OrderedDict()

    def connect(self, stub: session_grpc.SessionServiceAsyncStub) -> None:
        self._stub = stub

    @property
    def stub(self) -> session_grpc.SessionServiceAsyncStub:
        if self._stub is None:
            raise RuntimeError("the gateway's gRPC channels are not open")
        return self._stub

    async def create(self, key: str) -> session_pb.CreateSessionResponse:
        """A new session for `key` (already checked against the key ring)."""
        with forwarding(f"Bearer {key}"):
            return await self.stub.CreateSession(
                session_pb.CreateSessionRequest(), timeout=self.rpc_timeout
            )

    async def revoke(self, credential: Credential) -> None:
        """End the session, here at once and everywhere within CACHE_SECONDS; one that has
        ended already is no error."""
        self._live.pop(session_hash(credential.token), None)
        with forwarding(credential.metadata):
            try:
                await self.stub.RevokeSession(
                    session_pb.RevokeSessionRequest(), timeout=self.rpc_timeout
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise

    async def is_live(self, credential: Credential) -> bool:
        """Whether the session is live (the gRPC call carries it as its credential)."""
        digest = session_hash(credential.token)
        until = self._live.get(digest)
        if until is not None and until > self._clock():
            return True
        try:
            with forwarding(credential.metadata):
                await self.stub.GetSession(
                    session_pb.GetSessionRequest(), timeout=min(5.0, self.rpc_timeout)
                )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._live.pop(digest, None)
                return False
            raise error_from_rpc(exc) from None  # a page for /ui/ routes, JSON elsewhere
        self._live[digest] = self._clock() + CACHE_SECONDS
        self._live.move_to_end(digest)
        while len(self._live) > _SESSIONS_REMEMBERED:
            self._live.popitem(last=False)
        return True
