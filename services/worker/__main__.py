"""python -m services.worker — consumes ImageTasks; serves gRPC health only."""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor

from services.common.config import WorkerSettings
from services.common.fetch import fetch_image, make_session
from services.common.grpc_server import run_service
from services.common.resources import load_settings, open_backends
from services.common.storage import Storage
from services.common.streams import TaskConsumer
from services.worker.processor import Processor, RetryPolicy
from services.worker.runner import consume


async def main(settings: WorkerSettings) -> None:
    common = settings.common
    async with open_backends("worker", common, pool_size=settings.concurrency + 2) as backends:
        session = make_session(
            settings.fetch_allow, settings.fetch_limits, limit_per_host=settings.fetch_per_host
        )
        # Pillow releases the GIL while decoding and encoding, so threads use every core.
        executor = ThreadPoolExecutor(settings.threads, thread_name_prefix="compress")
        try:
            processor = Processor(
                pool=backends.pool,
                redis=backends.redis,
                names=backends.names,
                storage=Storage.from_url(common.storage_url, common.public_base_url),
                fetch=functools.partial(fetch_image, session, limits=settings.fetch_limits),
                executor=executor,
                image_limits=settings.image_limits,
                retry=RetryPolicy(max_attempts=settings.max_attempts),
            )
            consumer = TaskConsumer(backends.redis, backends.names, settings.consumer_name)

            async def consuming(stop: asyncio.Event) -> None:
                await consume(consumer, processor, settings.concurrency, stop)

            await run_service(
                listen=common.grpc_listen, loops=[consuming], grace=common.grace_seconds
            )
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            await session.close()


if __name__ == "__main__":
    asyncio.run(main(load_settings("worker", WorkerSettings.from_env, os.environ)))
