"""python -m services.status — the StatusService."""

from __future__ import annotations

import asyncio
import os

from services.common.config import StatusSettings
from services.common.grpc_server import run_service
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.resources import load_settings, open_backends
from services.common.storage import Storage
from services.status.servicer import StatusServicer, registrar


async def main(settings: StatusSettings) -> None:
    common = settings.common
    async with open_backends("status", common) as backends:
        storage = Storage.from_url(common.storage_url, common.public_base_url)
        await run_service(
            listen=common.grpc_listen,
            service_names=[status_pb.DESCRIPTOR.services_by_name["StatusService"].full_name],
            register=registrar(StatusServicer(backends.pool, storage)),
            grace=common.grace_seconds,
        )


if __name__ == "__main__":
    asyncio.run(main(load_settings("status", StatusSettings.from_env, os.environ)))
