"""Processing one ImageTask: fetch, compress, store, record; and finishing a request.

The order matters for at-least-once delivery: the output is stored under a deterministic key
before the outcome is committed, and the caller acknowledges the stream entry only after the
commit. A task delivered twice finds its image already final and only checks the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import failpoints, metrics, telemetry
from services.common import storage as keys
from services.common.db import lifecycle, queries
from services.common.fetch import KeepWaiting, OriginBusy, OriginKey, Reserve, origin_key
from services.common.image_options import ImageLimits, from_proto
from services.common.outcome import ImageFailure, OutcomeCode, RetryPolicy
from services.common.pb.imgpipe.v1 import task_pb2
from services.common.proto_convert import finished_event, progress_event
from services.common.storage import Storage
from services.common.stored_csv import render_output_csv, store_output_csv
from services.common.streams import (
    StreamNames,
    publish_event_once,
    publish_progress,
    slot_demand,
)
from services.worker import dedup
from services.worker.batching import Batcher, Expected, KeyedBatcher, Ticket
from services.worker.budget import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_PIXEL_BUDGET,
    ByteBudget,
    Lease,
    PixelBudget,
)
from services.worker.imaging import Compressed, compress
from services.worker.turns import CodecTurns

log = logging.getLogger(__name__)

# How long a Done record waits for others to share its statement (IMGPIPE_WORKER_RECORD_LINGER_MS).
DEFAULT_RECORD_LINGER = 0.2
# How long a task waits for a connection to its origin in its slot (IMGPIPE_FETCH_CONNECTION_WAIT).
DEFAULT_CONNECTION_WAIT = 1.0
# Tasks waiting for a slot read before a task that waited that long gives its slot back:
# twice the feeder's default lookahead (services/ingest/config.py), so the read sees them all.
DEFAULT_WAITING_READ = 64
# Tries of one request's Done statement when Postgres fails it to break a lock cycle.
RECORD_TRIES = 3


async def record_images_done(
    conn: queries.Connection, images: Sequence[queries.DoneImage], *, tries: int = RECORD_TRIES
) -> dict[int, queries.Counters]:
    """queries.record_images_done, tried again when Postgres breaks a lock cycle by failing it
    (a deadlock or a serialization failure: TransactionRollbackError). The statement is atomic
    and conditional, so trying again records what the failed try did not; without it, one
    broken cycle failed every image of the batch, other requests' included, and the worker
    compressed them all again."""
    for attempt in range(1, tries):
        try:
            return await queries.record_images_done(conn, images)
        except asyncpg.exceptions.TransactionRollbackError as exc:
            log.warning("recording images again: %s", exc, extra={"attempt": attempt})
    return await queries.record_images_done(conn, images)


@dataclass(frozen=True, slots=True)
class FailedImage:
    """An image's failure, to be recorded with its reason (queries.record_image_failed)."""

    image_id: int
    code: str
    message: str


# What a task records at its end, in its request's batch.
Outcome = queries.DoneImage | FailedImage


def _image_id(outcome: Outcome) -> int:
    return outcome.image_id if isinstance(outcome, FailedImage) else outcome.output.image_id


class Deferred(Exception):
    """The image went back to waiting for `delay` seconds (queries.defer_image): its task is
    over, and is acknowledged."""

    def __init__(self, reason: str, delay: float) -> None:
        super().__init__(reason, delay)
        # "retry": between attempts; "cooldown": the origin's Retry-After; "busy": every
        # connection to the origin stayed in use longer than the task may wait for one.
        self.reason = reason
        self.delay = delay


class Fetch(Protocol):
    """fetch_image with its session and limits bound (see services.worker.__main__)."""

    def __call__(
        self,
        url: str,
        *,
        reserve: Reserve | None = None,
        connection_wait: float | None = None,
        keep_waiting: KeepWaiting | None = None,
    ) -> Awaitable[bytes]: ...


class Processor:
    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        names: StreamNames,
        storage: Storage,
        fetch: Fetch,
        executor: Executor,
        image_limits: ImageLimits,
        retry: RetryPolicy,
        threads: int = 2,
        buffers: ByteBudget | None = None,
        pixels: PixelBudget | None = None,
        reuse_outputs: bool = True,
        record_linger: float = DEFAULT_RECORD_LINGER,
        connection_wait: float = DEFAULT_CONNECTION_WAIT,
        waiting_read: int = DEFAULT_WAITING_READ,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.names = names
        self.storage = storage
        self.fetch = fetch
        self.executor = executor
        # The executor's `threads`, taken in turns by request (services/worker/turns.py).
        self.codec = CodecTurns(executor, threads)
        self.image_limits = image_limits
        self.retry = retry
        # How long a task waits for a connection to a busy origin before it gives its slot
        # back; an image does so at most retry.max_busy_waits times, then waits in its slot.
        self.connection_wait = connection_wait
        # How many tasks waiting for a slot _keep_waiting reads to see whether one is of
        # another origin: more than the feeder's lookahead (IMGPIPE_SCHEDULER_LOOKAHEAD) keeps.
        self.waiting_read = waiting_read
        # Many tasks wait on origins at once; these bound what they hold once the bytes come.
        self.buffers = buffers or ByteBudget(DEFAULT_BUFFER_BYTES)
        self.pixels = pixels or PixelBudget(DEFAULT_PIXEL_BUDGET)
        # Off: every image is compressed, and nothing is remembered (services/worker/dedup.py).
        self.reuse_outputs = reuse_outputs
        # One round trip for many images (services/worker/batching.py): the checks that start
        # tasks read together, the Done records wait up to `record_linger` for company, and
        # the progress they cause is published together, the newest per request.
        self._states = Batcher(self._read_states, observe=metrics.batch_sized("status"))
        self._reusable = Batcher(self._find_reusable, observe=metrics.batch_sized("reuse"))
        self._working = Expected()  # tasks that have not reached their record yet
        # A batcher per request, each batch on its own connection: a statement that waits for
        # one request's row (a retry holds it for seconds) holds up that request's records
        # only, on one connection, however many of its images end meanwhile. At most half the
        # pool records at once; the rest stays for everything else.
        self._record: KeyedBatcher[uuid.UUID, Outcome, queries.Counters | None] = KeyedBatcher(
            self._record_batch,
            linger=record_linger,
            expected=self._working,
            observe=metrics.batch_sized("record"),
        )
        self._recorders = asyncio.Semaphore(max(1, pool.get_max_size() // 2))
        self._progress = Batcher(self._publish_progress, observe=metrics.batch_sized("progress"))
        # Requests whose finish runs in this process now: another task that completes the
        # same request asks the running finish to look again instead of rendering it twice.
        self._finishing: dict[uuid.UUID, bool] = {}

    async def process(
        self,
        task: task_pb2.ImageTask,
        deliveries: int = 1,
        on_recording: Callable[[], None] | None = None,
    ) -> None:
        """Bring the task's image to a final state. Raises only for infrastructure failures
        (Postgres, Redis, storage), in which case the entry must not be acknowledged.

        Every delivery checks the image first: one already final (a duplicate, or an image of a
        cancelled request) is not downloaded, and a redelivery (a crash happened) then finishes
        its request. The outcome is recorded conditionally, so a race costs a download, never a
        wrong count.

        `on_recording` is called once the image's work is over: it only waits for its record
        (which lingers for other tasks' records, services/worker/batching.py) or has failed.
        """
        ticket = self._working.ticket(on_recording)
        try:
            await self._process(task, deliveries, ticket)
        finally:
            ticket.done()

    async def _process(self, task: task_pb2.ImageTask, deliveries: int, ticket: Ticket) -> None:
        request_id = uuid.UUID(task.request_id)
        # Checked on every delivery, not only redeliveries: a cancelled request's images are
        # final already, and none of them may start downloading (docs/lifecycle.md).
        state = await self._states(task.image_id)
        if state is None:
            log.info("task for unknown image dropped", extra={"image_id": task.image_id})
            return
        if state.deferred:  # a stale entry: the image waits in Postgres for its next release
            return
        if state.cancelling:  # its request's cancel fails it (lifecycle.cancel_request)
            return
        if state.status != "Pending":
            if deliveries > 1:
                await self._finish_once(request_id)
            return
        wait = self.connection_wait if state.busy_waits < self.retry.max_busy_waits else None
        try:
            counters = await self._compress_and_store(task, request_id, ticket, wait)
        except Deferred as deferred:
            ticket.done()
            log.info(
                "image deferred; its slot is given back",
                extra={
                    "image_id": task.image_id,
                    "reason": deferred.reason,
                    "delay": deferred.delay,
                },
            )
            metrics.IMAGES_DEFERRED.labels(deferred.reason).inc()
            return
        except ImageFailure as failure:
            ticket.done()
            log.info(
                "image failed",
                extra={
                    "image_id": task.image_id,
                    "code": str(failure.code),
                    "error": failure.message,
                },
            )
            counters = await self._record(
                request_id, FailedImage(task.image_id, str(failure.code), failure.message)
            )
            if counters is not None:  # None: another delivery recorded it first
                metrics.image_failed(str(failure.code))
        if counters is not None:
            await self.announce(counters)
            if counters.all_final:
                await self._finish_once(request_id)

    async def _read_states(self, image_ids: Sequence[int]) -> list[queries.ImageState | None]:
        async with self.pool.acquire() as conn:
            found = await queries.image_states(conn, image_ids)
        return [found.get(image_id) for image_id in image_ids]

    async def _find_reusable(
        self, lookups: Sequence[tuple[uuid.UUID, queries.SourceDigests]]
    ) -> list[queries.StoredOutput | None]:
        async with self.pool.acquire() as conn:
            return await queries.find_reusable_outputs(conn, lookups)

    async def announce(self, counters: queries.Counters) -> None:
        """Tell live watchers; losing this message loses nothing (they re-read Postgres)."""
        try:
            await self._progress(counters)
        except RedisError as exc:
            log.warning("progress not published", extra={"error": repr(exc)})

    async def _publish_progress(self, batch: Sequence[queries.Counters]) -> list[None]:
        """One message per request of the batch: its newest counters (a batch's counters are
        in the order their statements committed, so the last one of a request is the newest)."""
        newest = {counters.request_id: counters for counters in batch}
        await publish_progress(self.redis, self.names, [progress_event(c) for c in newest.values()])
        return [None] * len(batch)

    async def _compress_and_store(
        self,
        task: task_pb2.ImageTask,
        request_id: uuid.UUID,
        ticket: Ticket,
        connection_wait: float | None,
    ) -> queries.Counters | None:
        done = await self._produce(task, request_id, connection_wait)
        with telemetry.span("record"):
            return await self._record_done(task, ticket, done)

    async def _produce(
        self, task: task_pb2.ImageTask, request_id: uuid.UUID, connection_wait: float | None
    ) -> queries.DoneImage:
        """The image's output, stored under its key: a copy of the owner's earlier output of
        the same source and options, or compressed here. What the record needs, and no image
        bytes: a record may linger for other tasks' (batching.py)."""
        async with self.buffers.lease(task.request_id) as lease:
            data = await self._fetch(task, lease, connection_wait)
            await lease.settle(len(data))  # the fetch reserved in steps: keep what it is
            options = from_proto(task.options)
            digests = None
            if self.reuse_outputs:
                digests = await self.codec.run(task.request_id, dedup.digests_of, data, options)
                reused = await dedup.reuse_stored(
                    self._reusable, self.storage, request_id, task.image_id, digests
                )
                if reused is not None:
                    return queries.DoneImage(reused.output, len(data), digests, reused.from_image)
            try:
                result = await self.codec.run(
                    task.request_id, compress, data, options, self.image_limits, self.pixels
                )
            except ImageFailure:
                raise
            except Exception as exc:  # a Pillow bug or MemoryError must fail the image
                log.exception("compress crashed", extra={"image_id": task.image_id})
                raise ImageFailure(OutcomeCode.INTERNAL, f"{type(exc).__name__}: {exc}") from exc
            bytes_in = len(data)
            del data  # the lease ends here, and so does the input
        _record_compress_spans(result, time.time_ns())
        metrics.STAGE_SECONDS.labels("decode").observe(result.decode_seconds)
        metrics.STAGE_SECONDS.labels("encode").observe(result.encode_seconds)
        key = keys.image_key(request_id, task.image_id, result.extension)
        started = time.perf_counter()
        with telemetry.span("store", attributes={"imgpipe.bytes": len(result.data)}):
            await self.storage.put(key, result.data, result.content_type)
        metrics.STAGE_SECONDS.labels("store").observe(time.perf_counter() - started)
        output = queries.StoredOutput(
            task.image_id,
            key,
            len(result.data),
            result.width,
            result.height,
            result.kept_source,
            result.ssim,
            result.quality,
            result.note,
        )
        return queries.DoneImage(output, bytes_in, digests)

    async def _record_done(
        self, task: task_pb2.ImageTask, ticket: Ticket, done: queries.DoneImage
    ) -> queries.Counters | None:
        """Record the image Done, its output stored under its key, in a batch with its
        request's other tasks' (`_record_batch`); the task's work ends as it joins the batch."""
        ticket.done()
        counters = await self._record(uuid.UUID(task.request_id), done)
        if counters is not None:
            metrics.image_done(
                done.bytes_in, done.output.bytes_out, reused=done.reused_from is not None
            )
            return counters
        # Not recorded (rare): another delivery recorded it first, or the request is being
        # deleted, or is gone, while this image was in flight. Then the delete may have listed
        # the store before this output was written, so it is this task's to remove (removing
        # it twice is harmless).
        async with self.pool.acquire() as conn:
            unwanted = await lifecycle.output_unwanted(conn, task.image_id)
        if unwanted:
            await self.storage.delete([done.output.output_key])
        return None

    async def _record_batch(
        self, request_id: uuid.UUID, batch: Sequence[Outcome]
    ) -> list[queries.Counters | None]:
        """Record a batch of one request's outcomes on one connection: its Done images in one
        statement, then each failure in its own. Each image's counters after its record (the
        last record's show whether the request is complete), or None if it was final."""
        done = [outcome for outcome in batch if isinstance(outcome, queries.DoneImage)]
        async with self._recorders, self.pool.acquire() as conn:
            recorded = await record_images_done(conn, done) if done else {}
            for failed in batch:
                if isinstance(failed, FailedImage):
                    counters = await queries.record_image_failed(
                        conn, failed.image_id, code=failed.code, message=failed.message
                    )
                    if counters is not None:
                        recorded[failed.image_id] = counters
        return [recorded.get(_image_id(outcome)) for outcome in batch]

    async def _fetch(
        self, task: task_pb2.ImageTask, lease: Lease, connection_wait: float | None
    ) -> bytes:
        """One attempt at the download. A transient failure with attempts left, an origin in
        its Retry-After cooldown, or one whose connections all stayed busy while another task
        wanted the slot (_keep_waiting; neither saw a request, so that is no attempt; each a
        bounded number of times), puts the image back to waiting for the feeder until its
        time comes: the task ends and its slot serves others meanwhile (docs/scheduling.md).
        The last transient error stays on the image row, so a task dead-lettered later fails
        with it."""
        started, waited = time.perf_counter(), lease.waited
        try:
            with telemetry.span("fetch", attributes={"url.full": task.input_url}):
                data = await self.fetch(
                    task.input_url,
                    reserve=lease.reserve,
                    connection_wait=connection_wait,
                    keep_waiting=self._keep_waiting,
                )
        except OriginBusy as busy:
            lease.release()
            delay = min(busy.delay, self.retry.max_wait)
            async with self.pool.acquire() as conn:
                if await queries.defer_image(conn, task.image_id, delay, wait="busy"):
                    failpoints.crash_here("worker.after_defer")
                    raise Deferred("busy", delay) from busy
            # Final already (its request was cancelled): recording this changes nothing.
            raise ImageFailure(OutcomeCode.CONNECTION, str(busy), transient=True) from busy
        except ImageFailure as failure:
            lease.release()  # nothing is held while the image waits
            if not failure.sent:
                delay = min(failure.retry_after or 1.0, self.retry.max_wait)
                async with self.pool.acquire() as conn:
                    if await queries.defer_image(
                        conn,
                        task.image_id,
                        delay,
                        wait="cooldown",
                        most=self.retry.max_cooldown_waits,
                    ):
                        failpoints.crash_here("worker.after_defer")
                        raise Deferred("cooldown", delay) from failure
            async with self.pool.acquire() as conn:
                attempt = await queries.record_attempt(
                    conn, task.image_id, code=str(failure.code), message=failure.message
                )
                # 0: the image is final already (its request was cancelled): no retry.
                if failure.transient and 0 < attempt < self.retry.max_attempts:
                    delay = self.retry.delay(attempt, failure.retry_after)
                    if await queries.defer_image(conn, task.image_id, delay):
                        failpoints.crash_here("worker.after_defer")  # before the XACK
                        raise Deferred("retry", delay) from failure
            raise
        # The download itself: time spent waiting for the byte budget is not fetching.
        fetching = time.perf_counter() - started - (lease.waited - waited)
        metrics.STAGE_SECONDS.labels("fetch").observe(fetching)
        return data  # record_image_done counts this successful attempt

    async def _keep_waiting(self, busy: OriginKey) -> bool:
        """Asked each `connection_wait` a task waits for a connection to `busy`: whether it
        keeps its place in the origin's queue (and its slot) for another round. It does unless
        a task waiting for a slot would download from another origin: those of `busy` would
        only queue for the same connections, and given back, the image would be away when a
        connection frees (the last images of a request at a slow origin, or a catalog from
        one origin). When the read is full, more wait behind it than it saw: as if one did.
        And when the feeder reports a request starved (nothing of it on the stream, and no
        room there), giving the slot back takes an entry off the stream, which makes room."""
        demand = await slot_demand(self.redis, self.names, self.waiting_read)
        wanted = (
            demand.starved
            or len(demand.waiting) == self.waiting_read
            or any(origin_key(task.input_url) != busy for task in demand.waiting)
        )
        return not wanted

    async def _finish_once(self, request_id: uuid.UUID) -> None:
        """finish_if_complete, or, while this process already runs it for the request, ask
        that run to look once more when it ends (it may have read the counters before the
        image that calls this was recorded). A task that asks returns at once: the task whose
        run is in progress stays unacknowledged until it ends, so a crash meanwhile still
        leaves a delivery to finish the request."""
        if request_id in self._finishing:
            self._finishing[request_id] = True
            return
        self._finishing[request_id] = False
        try:
            await self.finish_if_complete(request_id)
            while self._finishing[request_id]:
                self._finishing[request_id] = False
                await self.finish_if_complete(request_id)
        finally:
            del self._finishing[request_id]

    async def finish_if_complete(self, request_id: uuid.UUID) -> None:
        """Finish a request whose images are all final: render the output CSV, mark it
        Completed or Failed, publish request.finished. Safe to call any number of times. For
        a Cancelled request, only store its output CSV again (a late result, docs/lifecycle.md)."""
        with telemetry.span("finish request"):
            await self._finish_if_complete(request_id)

    async def _finish_if_complete(self, request_id: uuid.UUID) -> None:
        async with self.pool.acquire() as conn:
            counters = await queries.counters(conn, request_id)
        if counters is None or not counters.all_final:
            return
        if counters.status == "Cancelled":
            # A result in flight at the cancel was recorded since (or this is a delivery again
            # of one whose CSV was not stored): the CSV written at the cancel lists it now.
            await store_output_csv(self.pool, self.storage, request_id)
            return
        async with self.pool.acquire() as conn:
            if await queries.is_final(conn, request_id):
                return
            csv_key = keys.output_csv_key(request_id)
            csv = await render_output_csv(conn, self.storage, request_id)
            await self.storage.put(csv_key, csv, "text/csv")
            finished = await queries.finish_request(conn, request_id, output_csv_key=csv_key)
        if finished is None:
            return  # another worker finished it first
        if finished.completed_at is not None:
            seconds = (finished.completed_at - finished.created_at).total_seconds()
            metrics.request_finished(finished.status, seconds)
        log.info(
            "request finished", extra={"request_id": str(request_id), "status": finished.status}
        )
        await self.announce(queries.Counters.of(finished))
        await self.publish_finished(finished)

    async def publish_finished(self, request: queries.RequestRow) -> None:
        """Publish request.finished once per finish, then note it in the outbox column.

        A crash before the XADD leaves finished_event_at NULL and the reconciler publishes it;
        a crash after it makes the reconciler try again, which the event-id guard makes a no-op.
        """
        await publish_event_once(self.redis, self.names, finished_event(request))
        async with self.pool.acquire() as conn:
            await queries.mark_event_published(conn, request.id, request.finish_generation)

    async def give_up(self, task: task_pb2.ImageTask, deliveries: int) -> tuple[str, str]:
        """Fail the image of a task delivered too often, with its last error; returns it."""
        async with self.pool.acquire() as conn:
            code, message = await queries.last_error(conn, task.image_id)
            code = code or str(OutcomeCode.INTERNAL)
            message = f"gave up after {deliveries} deliveries" + (
                f"; last error: {message}" if message else ""
            )
            counters = await queries.record_image_failed(
                conn, task.image_id, code=code, message=message
            )
        if counters is not None:
            metrics.image_failed(code)
            await self.announce(counters)
            if counters.all_final:
                await self._finish_once(counters.request_id)
        return code, message


def _record_compress_spans(result: Compressed, ended_ns: int) -> None:
    """The decode and encode spans of a compress that ended at `ended_ns`, from its timings (the
    thread that ran it has no span of its own); time waiting for the pixel budget is left out."""
    encode_began = ended_ns - int(result.encode_seconds * 1e9)
    telemetry.record_span("decode", encode_began - int(result.decode_seconds * 1e9), encode_began)
    telemetry.record_span(
        "encode", encode_began, ended_ns, {"imgpipe.format": str(result.format.value)}
    )
