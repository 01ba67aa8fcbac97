"""python -m services.ingest — the IngestService."""

from __future__ import annotations

import os

from services.common.auth import log_auth_state
from services.common.grpc_auth import ApiKeyInterceptor
from services.common.grpc_server import Health, run_service
from services.common.limits import Limiter
from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.process import run_main
from services.common.resources import load_settings, open_backends
from services.common.sessions import SessionStore
from services.ingest.config import IngestSettings
from services.ingest.feeder import Feeder
from services.ingest.servicer import IngestServicer, registrar

SERVICE = ingest_pb.DESCRIPTOR.services_by_name["IngestService"].full_name


async def main(settings: IngestSettings) -> None:
    async with open_backends("ingest", settings.common) as backends:
        log_auth_state(settings.api_keys, settings.common.grpc_listen)
        limiter = Limiter(backends.redis, backends.names, backends.pool)
        feeder = Feeder(
            pool=backends.pool,
            redis=backends.redis,
            names=backends.names,
            window=settings.scheduler_window,
            lookahead=settings.scheduler_lookahead,
            lookahead_seconds=settings.scheduler_lookahead_seconds,
            weights=settings.api_keys.weights,
            poll=settings.scheduler_poll,
        )
        servicer = IngestServicer(
            backends.pool,
            backends.redis,
            backends.names,
            settings.csv_limits,
            limiter,
            fetch_allow=settings.fetch_allow,
            fetch_ports=settings.fetch_ports,
            wake_feeder=feeder.wake,
        )
        health = Health([SERVICE])
        monitor = backends.monitor(health)

        await run_service(
            listen=settings.common.grpc_listen,
            service_names=[SERVICE],
            register=registrar(servicer),
            loops=[monitor.run, feeder.run],
            grace=settings.common.grace_seconds,
            transport=settings.common.grpc,
            health=health,
            interceptors=[
                ApiKeyInterceptor(
                    settings.api_keys,
                    limiter.check_rate,
                    # Browsers' sessions: made by the status service, resolved here too.
                    SessionStore(backends.pool, settings.api_keys).resolve,
                )
            ],
        )


if __name__ == "__main__":
    run_main(main(load_settings("ingest", IngestSettings.from_env, os.environ)))
