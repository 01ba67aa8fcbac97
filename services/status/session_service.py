"""SessionService: the web page's sign-ins, kept by the status service.

The store and its rules are services/common/sessions.py; this is the gRPC edge.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.common.grpc_auth import caller, caller_credential
from services.common.grpc_server import Register
from services.common.pb.imgpipe.v1 import session_service_pb2 as session_pb
from services.common.pb.imgpipe.v1 import session_service_pb2_grpc as session_grpc
from services.common.proto_convert import timestamp
from services.common.servicer_errors import rpc_method
from services.common.sessions import SessionStore

Context = grpc.aio.ServicerContext[Any, Any]


class SessionServicer(session_grpc.SessionServiceServicer):
    def __init__(self, store: SessionStore) -> None:
        self.store = store

    @rpc_method
    async def CreateSession(
        self, request: session_pb.CreateSessionRequest, context: Context
    ) -> session_pb.CreateSessionResponse:
        principal, credential = caller(), caller_credential()
        if principal is None or credential is None:
            raise InvalidArgument("authentication is off: there is nothing to sign in to")
        if credential.key_digest is None:
            # A session that could renew itself would never end.
            raise PermissionDenied("a session cannot start another: sign in with an API key")
        session_id, expires_at = await self.store.create(principal, credential.key_digest)
        return session_pb.CreateSessionResponse(
            session_id=session_id, expires_at=timestamp(expires_at)
        )

    @rpc_method
    async def GetSession(
        self, request: session_pb.GetSessionRequest, context: Context
    ) -> session_pb.GetSessionResponse:
        session = await self.store.find(_calling_session())
        if session is None:  # revoked since the interceptor looked
            raise Unauthenticated("the session has ended: sign in again", key_given=True)
        return session_pb.GetSessionResponse(
            owner=session.principal.name, expires_at=timestamp(session.expires_at)
        )

    @rpc_method
    async def RevokeSession(
        self, request: session_pb.RevokeSessionRequest, context: Context
    ) -> session_pb.RevokeSessionResponse:
        await self.store.revoke(_calling_session())
        return session_pb.RevokeSessionResponse()


def _calling_session() -> str:
    credential = caller_credential()
    if credential is None or credential.session_id is None:
        raise InvalidArgument(
            "this call is about the session it is made with: send `authorization: Session <id>`"
        )
    return credential.session_id


def registrar(servicer: SessionServicer) -> Register:
    return lambda server: session_grpc.add_SessionServiceServicer_to_server(servicer, server)
