"""python -m services.status — the StatusService."""

from __future__ import annotations

import asyncio
import os

import grpc

from services.common.auth import log_auth_state
from services.common.db import queries
from services.common.grpc_auth import ApiKeyInterceptor
from services.common.grpc_server import Health, run_service
from services.common.limits import Limiter
from services.common.pb.imgpipe.v1 import session_service_pb2 as session_pb
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.process import run_main
from services.common.resources import load_settings, open_backends
from services.common.sessions import SessionStore
from services.common.storage import Storage
from services.common.streams import WORKER_GROUP
from services.status.config import StatusSettings
from services.status.progress import ProgressHub
from services.status.servicer import StatusServicer, registrar
from services.status.session_service import SessionServicer
from services.status.session_service import registrar as session_registrar
from services.status.stream_metrics import StreamStats
from services.status.webhooks import GROUP as WEBHOOK_GROUP
from services.status.webhooks import WebhookDispatcher, webhook_session

SERVICE = status_pb.DESCRIPTOR.services_by_name["StatusService"].full_name
SESSION_SERVICE = session_pb.DESCRIPTOR.services_by_name["SessionService"].full_name


async def main(settings: StatusSettings) -> None:
    common = settings.common
    async with open_backends("status", common) as backends:
        log_auth_state(settings.api_keys, common.grpc_listen)
        limiter = Limiter(backends.redis, backends.names, backends.pool)
        storage = Storage.from_config(common.storage)
        hooks = settings.webhooks
        # Webhooks go through the same SSRF guard as image downloads.
        session = webhook_session(hooks)
        try:
            webhooks = WebhookDispatcher(
                pool=backends.pool,
                redis=backends.redis,
                names=backends.names,
                session=session,
                settings=hooks,
            )
            hub = ProgressHub(backends.redis, backends.names)
            servicer = StatusServicer(
                backends.pool, storage, backends.redis, backends.names, webhooks, hub, limiter
            )
            sessions = SessionStore(backends.pool, settings.api_keys, settings.session_ttl)
            session_servicer = SessionServicer(sessions)

            def register(server: grpc.aio.Server) -> None:
                registrar(servicer)(server)
                session_registrar(session_servicer)(server)

            health = Health([SERVICE, SESSION_SERVICE])
            names = backends.names

            async def backlog() -> int:
                async with backends.pool.acquire() as conn:
                    return await queries.backlog(conn)

            # The queue gauges of /metrics (imgpipe_stream_lag, _pending, _dead_letter_entries) and
            # imgpipe_backlog_images, which the autoscalers follow (deploy/k8s).
            stream_stats = StreamStats(
                backends.redis,
                [(names.tasks, WORKER_GROUP), (names.events, WEBHOOK_GROUP)],
                names.dead,
                backlog=backlog,
            )

            async def refresh(stop: asyncio.Event) -> None:
                await hub.run_refresh(stop, backends.pool)

            await run_service(
                listen=common.grpc_listen,
                service_names=[SERVICE, SESSION_SERVICE],
                register=register,
                loops=[
                    backends.monitor(health).run,
                    hub.run,
                    refresh,
                    webhooks.run_events,
                    webhooks.run_deliveries,
                    stream_stats.run,
                ],
                grace=common.grace_seconds,
                transport=common.grpc,
                health=health,
                interceptors=[
                    ApiKeyInterceptor(settings.api_keys, limiter.check_rate, sessions.resolve)
                ],
            )
        finally:
            await session.close()


if __name__ == "__main__":
    run_main(main(load_settings("status", StatusSettings.from_env, os.environ)))
