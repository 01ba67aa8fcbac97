"""python -m services.worker — consumes ImageTasks; serves gRPC health only."""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor

from services.common import metrics
from services.common.fetch import fetch_image, make_session
from services.common.grpc_server import Health, run_service
from services.common.process import run_main
from services.common.resources import load_settings, open_backends
from services.common.storage import Storage
from services.common.streams import TaskConsumer
from services.worker.budget import ByteBudget, PixelBudget, return_big_images_to_the_os
from services.worker.config import WorkerSettings
from services.worker.janitor import Janitor
from services.worker.processor import Processor
from services.worker.reconciler import Reconciler
from services.worker.runner import ConsumePolicy, consume


async def main(settings: WorkerSettings) -> None:
    common = settings.common
    return_big_images_to_the_os()
    metrics.prime_worker()
    async with open_backends("worker", common) as backends:
        session = make_session(
            settings.fetch_allow,
            settings.fetch_limits,
            limit_per_host=settings.fetch_per_host,
            observe_connection_wait=metrics.budget_waited("connections"),
        )
        # Pillow releases the GIL while decoding and encoding, so threads use every core.
        executor = ThreadPoolExecutor(settings.threads, thread_name_prefix="compress")
        try:
            storage = Storage.from_config(common.storage)
            processor = Processor(
                pool=backends.pool,
                redis=backends.redis,
                names=backends.names,
                storage=storage,
                fetch=functools.partial(fetch_image, session, limits=settings.fetch_limits),
                executor=executor,
                image_limits=settings.image_limits,
                retry=settings.retry,
                threads=settings.threads,
                buffers=ByteBudget(settings.buffer_bytes, metrics.budget_waited("bytes")),
                pixels=PixelBudget(settings.pixel_budget, metrics.budget_waited("pixels")),
                reuse_outputs=settings.reuse_outputs,
                record_linger=settings.record_linger,
                connection_wait=settings.connection_wait,
            )
            consumer = TaskConsumer(backends.redis, backends.names, settings.consumer_name)
            policy = ConsumePolicy(
                concurrency=settings.concurrency,
                visibility_timeout=settings.visibility_timeout,
                claim_interval=settings.claim_interval,
                max_deliveries=settings.max_deliveries,
            )
            reconciler = Reconciler(
                pool=backends.pool,
                redis=backends.redis,
                names=backends.names,
                processor=processor,
                min_age=settings.reconcile_min_age,
            )
            janitor = Janitor(
                pool=backends.pool,
                redis=backends.redis,
                names=backends.names,
                storage=storage,
                retention_days=settings.retention_days,
            )
            health = Health([])
            monitor = backends.monitor(health, storage=storage.probe)

            async def consuming(stop: asyncio.Event) -> None:
                await consume(consumer, processor, policy, stop, monitor)

            async def reconciling(stop: asyncio.Event) -> None:
                await reconciler.run(stop, settings.reconcile_interval)

            async def sweeping(stop: asyncio.Event) -> None:
                await janitor.run(stop, settings.janitor_interval)

            await run_service(
                listen=common.grpc_listen,
                loops=[monitor.run, consuming, reconciling, sweeping],
                grace=common.grace_seconds,
                transport=common.grpc,
                health=health,
            )
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            await session.close()


if __name__ == "__main__":
    run_main(main(load_settings("worker", WorkerSettings.from_env, os.environ)))
