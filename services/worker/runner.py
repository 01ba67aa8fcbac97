"""The worker's read loop: a bounded number of tasks in flight, acked after their commit."""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from services.common.grpc_server import wait_or_stop
from services.common.streams import Delivery, TaskConsumer
from services.worker.processor import Processor

log = logging.getLogger(__name__)

READ_BLOCK_MS = 1000  # also bounds how long a SIGTERM waits for the read to return
BACKOFF_MAX = 10.0


async def consume(
    consumer: TaskConsumer, processor: Processor, concurrency: int, stop: asyncio.Event
) -> None:
    """Read and process tasks until `stop` is set, then let in-flight tasks finish.

    The caller (run_service) cancels stragglers after the grace period; a cancelled task is
    simply not acknowledged, so it is delivered again later.
    """
    await consumer.ensure_group()
    in_flight: set[asyncio.Task[None]] = set()
    failures = 0
    try:
        while not stop.is_set():
            free = concurrency - len(in_flight)
            if free <= 0:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                deliveries = await consumer.read(free, READ_BLOCK_MS)
                failures = 0
            except (RedisError, OSError) as exc:
                failures += 1
                delay = min(BACKOFF_MAX, 0.2 * 2**failures)
                log.warning("reading tasks failed", extra={"error": str(exc), "retry_in": delay})
                await wait_or_stop(stop, delay)
                continue
            for delivery in deliveries:
                task = asyncio.create_task(_handle(consumer, processor, delivery))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
    finally:
        if in_flight:
            log.info("draining in-flight tasks", extra={"tasks": len(in_flight)})
            await asyncio.gather(*in_flight, return_exceptions=True)


async def _handle(consumer: TaskConsumer, processor: Processor, delivery: Delivery) -> None:
    try:
        await processor.process(delivery.task)
        await consumer.ack([delivery.entry_id])
    except asyncio.CancelledError:
        raise
    except Exception:
        # Postgres, Redis or storage failed: leave the entry pending so it is delivered again.
        log.exception(
            "task not processed; left pending",
            extra={"image_id": delivery.task.image_id, "entry_id": delivery.entry_id},
        )
