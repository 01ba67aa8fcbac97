"""The worker's read loop: a bounded number of tasks in flight, acknowledged after their commit.

Besides new entries, it takes over entries that another consumer left idle past the visibility
timeout (that consumer died), and dead-letters an entry delivered more than `max_deliveries`
times. While Postgres, Redis or storage is down it reads nothing: a task that hit the outage is
retried in place once they answer again, and is never acknowledged unfinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from services.common import metrics, telemetry, tracing
from services.common.dependencies import DependencyMonitor
from services.common.grpc_server import wait_or_stop
from services.common.servicer_errors import BACKEND_ERRORS
from services.common.streams import READ_BLOCK_MS, Delivery, TaskConsumer
from services.worker.batching import Batcher
from services.worker.processor import Processor

log = logging.getLogger(__name__)

# A worker reads when a quarter of its slots are free, or when any is and this long has passed
# since its last read: tasks that hold their slots for seconds (24 MP photos) free a quarter
# only every few seconds, and the stream's next entry (a newcomer's) waited that long.
REFILL_LINGER = 0.1
BACKOFF_MAX = 10.0
# A task that keeps meeting a backend outage is retried in place this many times, then left
# pending (not acknowledged) for another delivery.
OUTAGE_RETRIES = 50


@dataclass(frozen=True, slots=True)
class ConsumePolicy:
    concurrency: int = 8
    visibility_timeout: float = 300.0
    claim_interval: float = 10.0
    max_deliveries: int = 5


async def consume(
    consumer: TaskConsumer,
    processor: Processor,
    policy: ConsumePolicy,
    stop: asyncio.Event,
    monitor: DependencyMonitor | None = None,
) -> None:
    """Read and process tasks until `stop` is set, then let in-flight tasks finish.

    The caller (run_service) cancels stragglers after the grace period; a cancelled task is
    simply not acknowledged, so it is delivered again later.
    """
    monitor = monitor or DependencyMonitor({})
    # By entry id: XAUTOCLAIM may hand back an entry this worker is still processing (when it
    # is slower than the visibility timeout); it must not be processed twice at once.
    in_flight: dict[str, asyncio.Task[None]] = {}
    slots = Slots(policy.concurrency)
    # The tasks one batch of records wakes acknowledge their entries in one XACK.
    acks: Batcher[str, None] = Batcher(
        functools.partial(_ack, consumer), observe=metrics.batch_sized("ack")
    )
    failures = 0
    next_claim = 0.0
    last_read = 0.0
    await consumer.ensure_group()
    try:
        while not stop.is_set():
            if not await monitor.wait_healthy(stop):
                break
            # Read when a quarter of the slots are free, not one by one: each read is a round
            # trip to Redis and another to Postgres (the tasks' first check), whatever its size.
            # But not later than REFILL_LINGER after the last read, once a slot is free.
            free = slots.free
            linger = last_read + REFILL_LINGER - time.monotonic()
            wanted = slots.refill if linger > 0 else 1
            if free < wanted:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(linger if linger > 0 else None):
                        await slots.wait_free(wanted)
                continue
            last_read = time.monotonic()
            try:
                deliveries: list[Delivery] = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + policy.claim_interval
                    deliveries = await consumer.claim_stale(
                        int(policy.visibility_timeout * 1000), free
                    )
                    metrics.TASKS_RECLAIMED.inc(len(deliveries))
                if not deliveries:
                    deliveries = await consumer.read(free, READ_BLOCK_MS)
                failures = 0
            except (RedisError, OSError) as exc:
                failures += 1
                monitor.report_failure()
                delay = min(BACKOFF_MAX, 0.2 * 2**failures)
                log.warning("reading tasks failed", extra={"error": str(exc), "retry_in": delay})
                await wait_or_stop(stop, delay)
                continue
            for delivery in deliveries:
                if delivery.entry_id in in_flight:
                    continue
                slots.take(delivery.entry_id)
                task = asyncio.create_task(
                    _handle(consumer, processor, acks, slots, delivery, policy, monitor, stop)
                )
                in_flight[delivery.entry_id] = task
                task.add_done_callback(
                    functools.partial(_forget, in_flight, slots, delivery.entry_id)
                )
    finally:
        if in_flight:
            log.info("draining in-flight tasks", extra={"tasks": len(in_flight)})
            await asyncio.gather(*in_flight.values(), return_exceptions=True)


async def _ack(consumer: TaskConsumer, entry_ids: Sequence[str]) -> list[None]:
    await consumer.ack(entry_ids)
    return [None] * len(entry_ids)


class Slots:
    """`size` slots for tasks whose image work is not over. A task whose image only waits
    for its record (which lingers for other tasks', batching.py) gives its slot back; those
    tasks are bounded too, to another `size`, so a slow Postgres slows the reading down
    instead of letting unrecorded images pile up."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.refill = max(1, size // 4)
        self._working: set[str] = set()
        self._tasks: set[str] = set()
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        return min(self.size - len(self._working), 2 * self.size - len(self._tasks))

    def take(self, entry_id: str) -> None:
        self._working.add(entry_id)
        self._tasks.add(entry_id)

    def work_over(self, entry_id: str) -> None:
        if entry_id in self._working:
            self._working.discard(entry_id)
            self._changed.set()

    def finished(self, entry_id: str) -> None:
        self.work_over(entry_id)
        self._tasks.discard(entry_id)
        self._changed.set()

    async def wait_free(self, count: int) -> None:
        while self.free < count:
            self._changed.clear()
            await self._changed.wait()


def _forget(
    in_flight: dict[str, asyncio.Task[None]], slots: Slots, entry_id: str, _: object
) -> None:
    in_flight.pop(entry_id, None)
    slots.finished(entry_id)


async def _handle(
    consumer: TaskConsumer,
    processor: Processor,
    acks: Batcher[str, None],
    slots: Slots,
    delivery: Delivery,
    policy: ConsumePolicy,
    monitor: DependencyMonitor,
    stop: asyncio.Event,
) -> None:
    task = delivery.task
    # One task per delivery (see consume): its log lines carry the request and the trace the
    # upload started, continued by this span.
    tracing.set_trace(tracing.continue_trace(task.traceparent))
    tracing.set_request_id(task.request_id)
    # With OpenTelemetry, the span of this task: a child of the upload's span, across the stream.
    attributes: dict[str, str | int] = {
        "imgpipe.request_id": task.request_id,
        "imgpipe.image_id": task.image_id,
    }
    with telemetry.span(
        "process image", parent=task.traceparent, kind="consumer", attributes=attributes
    ):
        for outage in range(OUTAGE_RETRIES):
            try:
                if delivery.deliveries > policy.max_deliveries:
                    code, message = await processor.give_up(task, delivery.deliveries)
                    await consumer.dead_letter(delivery, code, message)
                    log.error(
                        "task dead-lettered",
                        extra={"image_id": task.image_id, "deliveries": delivery.deliveries},
                    )
                else:
                    slots.take(delivery.entry_id)  # again, after an outage
                    await processor.process(
                        task,
                        delivery.deliveries,
                        functools.partial(slots.work_over, delivery.entry_id),
                    )
                    await acks(delivery.entry_id)
                return
            except asyncio.CancelledError:
                raise
            except BACKEND_ERRORS as exc:
                # Postgres, Redis or storage failed: nothing is acknowledged. Pause the worker,
                # wait for the dependencies, then try this task again.
                log.warning(
                    "backend failed; task kept and retried",
                    extra={"image_id": task.image_id, "error": repr(exc), "outage_retry": outage},
                )
                monitor.report_failure()
                await wait_or_stop(stop, min(BACKOFF_MAX, 0.2 * 2**outage))
                if stop.is_set() or not await monitor.wait_healthy(stop):
                    return  # released: the entry stays pending and is delivered again
            except Exception:
                log.exception(
                    "task failed unexpectedly; left pending",
                    extra={"image_id": task.image_id, "entry_id": delivery.entry_id},
                )
                return
