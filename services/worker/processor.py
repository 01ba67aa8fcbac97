"""Processing one ImageTask: fetch, compress, store, record; and finishing a request.

The order matters for at-least-once delivery: the output is stored under a deterministic key
before the outcome is committed, and the caller acknowledges the stream entry only after the
commit. A task delivered twice finds its image already final and only checks the request.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import Awaitable
from concurrent.futures import Executor
from typing import Protocol

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import metrics
from services.common import storage as keys
from services.common.budget import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_PIXEL_BUDGET,
    ByteBudget,
    Lease,
    PixelBudget,
)
from services.common.csv_format import OutputCsvWriter
from services.common.db import queries
from services.common.fetch import Reserve
from services.common.imaging import ImageLimits, compress
from services.common.outcome import ImageFailure, OutcomeCode, RetryPolicy
from services.common.pb.imgpipe.v1 import task_pb2
from services.common.proto_convert import finished_event, from_proto, progress_event
from services.common.storage import Storage
from services.common.streams import StreamNames, publish_event_once, publish_progress
from services.worker import dedup

log = logging.getLogger(__name__)


class Fetch(Protocol):
    """fetch_image with its session and limits bound (see services.worker.__main__)."""

    def __call__(self, url: str, *, reserve: Reserve | None = None) -> Awaitable[bytes]: ...


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
        buffers: ByteBudget | None = None,
        pixels: PixelBudget | None = None,
        reuse_outputs: bool = True,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.names = names
        self.storage = storage
        self.fetch = fetch
        self.executor = executor
        self.image_limits = image_limits
        self.retry = retry
        # Many tasks wait on origins at once; these bound what they hold once the bytes come.
        self.buffers = buffers or ByteBudget(DEFAULT_BUFFER_BYTES)
        self.pixels = pixels or PixelBudget(DEFAULT_PIXEL_BUDGET)
        # Off: every image is compressed, and nothing is remembered (services/worker/dedup.py).
        self.reuse_outputs = reuse_outputs

    async def process(self, task: task_pb2.ImageTask, deliveries: int = 1) -> None:
        """Bring the task's image to a final state. Raises only for infrastructure failures
        (Postgres, Redis, storage), in which case the entry must not be acknowledged.

        A first delivery goes straight to work: the outcome is recorded conditionally, so a
        duplicate costs a download, never a wrong count. A redelivery (a crash happened)
        checks the image first, and finishes its request if the image was already final.
        """
        request_id = uuid.UUID(task.request_id)
        if deliveries > 1:
            async with self.pool.acquire() as conn:
                state = await queries.image_status(conn, task.image_id)
            if state is None:
                log.warning("task for unknown image dropped", extra={"image_id": task.image_id})
                return
            if state[0] != "Pending":
                await self.finish_if_complete(request_id)
                return
        try:
            counters = await self._compress_and_store(task, request_id)
        except ImageFailure as failure:
            log.info(
                "image failed",
                extra={
                    "image_id": task.image_id,
                    "code": str(failure.code),
                    "error": failure.message,
                },
            )
            async with self.pool.acquire() as conn:
                counters = await queries.record_image_failed(
                    conn, task.image_id, code=str(failure.code), message=failure.message
                )
            if counters is not None:  # None: another delivery recorded it first
                metrics.image_failed(str(failure.code))
        if counters is not None:
            await self._announce(counters)
            if counters.all_final:
                await self.finish_if_complete(request_id)

    async def _announce(self, counters: queries.Counters) -> None:
        """Tell live watchers; losing this message loses nothing (they re-read Postgres)."""
        try:
            await publish_progress(self.redis, self.names, progress_event(counters))
        except RedisError as exc:
            log.warning("progress not published", extra={"error": repr(exc)})

    async def _compress_and_store(
        self, task: task_pb2.ImageTask, request_id: uuid.UUID
    ) -> queries.Counters | None:
        async with self.buffers.lease() as lease:
            data = await self._fetch_with_retries(task, lease)
            await lease.reserve(len(data))  # a body without Content-Length is counted now
            options = from_proto(task.options)
            loop = asyncio.get_running_loop()
            digests = None
            if self.reuse_outputs:
                digests = await loop.run_in_executor(self.executor, dedup.digests_of, data, options)
                reused = await dedup.reuse_stored(
                    self.pool, self.storage, request_id, task.image_id, digests
                )
                if reused is not None:
                    return await self._record_done(
                        task, len(data), reused.output, digests, reused_from=reused.from_image
                    )
            try:
                result = await loop.run_in_executor(
                    self.executor, compress, data, options, self.image_limits, self.pixels
                )
            except ImageFailure:
                raise
            except Exception as exc:  # a Pillow bug or MemoryError must fail the image
                log.exception("compress crashed", extra={"image_id": task.image_id})
                raise ImageFailure(OutcomeCode.INTERNAL, f"{type(exc).__name__}: {exc}") from exc
            bytes_in = len(data)
            del data  # the lease ends here, and so does the input
        metrics.STAGE_SECONDS.labels("decode").observe(result.decode_seconds)
        metrics.STAGE_SECONDS.labels("encode").observe(result.encode_seconds)
        key = keys.image_key(request_id, task.image_id, result.extension)
        started = time.perf_counter()
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
        return await self._record_done(task, bytes_in, output, digests)

    async def _record_done(
        self,
        task: task_pb2.ImageTask,
        bytes_in: int,
        output: queries.StoredOutput,
        digests: queries.SourceDigests | None,
        reused_from: int | None = None,
    ) -> queries.Counters | None:
        """Record the image Done with `output`, stored under its key (`reused_from`: the image
        whose output was copied there, services/worker/dedup.py)."""
        async with self.pool.acquire() as conn:
            counters = await queries.record_image_done(
                conn,
                task.image_id,
                output_key=output.output_key,
                bytes_in=bytes_in,
                bytes_out=output.bytes_out,
                width=output.width,
                height=output.height,
                kept_source=output.kept_source,
                ssim=output.ssim,
                quality=output.quality,
                note=output.note or "",
                digests=digests,
                reused_from=reused_from,
            )
        if counters is not None:  # None: another delivery recorded it first
            metrics.image_done(bytes_in, output.bytes_out, reused=reused_from is not None)
        return counters

    async def _fetch_with_retries(self, task: task_pb2.ImageTask, lease: Lease) -> bytes:
        """Fetch, retrying transient failures with backoff up to max_attempts real attempts.

        An origin in its Retry-After cooldown is waited for without spending an attempt (it saw
        no request), a bounded number of times. The last transient error stays on the image row,
        so a task dead-lettered later fails with it.
        """
        waits = 0
        while True:
            started, waited = time.perf_counter(), lease.waited
            try:
                data = await self.fetch(task.input_url, reserve=lease.reserve)
            except ImageFailure as failure:
                lease.release()  # nothing is held while waiting to try again
                if not failure.sent and waits < self.retry.max_cooldown_waits:
                    waits += 1
                    await asyncio.sleep(min(failure.retry_after or 1.0, self.retry.max_wait))
                    continue
                async with self.pool.acquire() as conn:
                    attempt = await queries.record_attempt(
                        conn, task.image_id, code=str(failure.code), message=failure.message
                    )
                if not failure.transient or attempt >= self.retry.max_attempts:
                    raise
                delay = self.retry.delay(attempt, failure.retry_after)
                log.info(
                    "transient fetch failure; retrying",
                    extra={"image_id": task.image_id, "attempt": attempt, "delay": delay},
                )
                await asyncio.sleep(delay)
            else:
                # The download itself: time spent waiting for the byte budget is not fetching.
                fetching = time.perf_counter() - started - (lease.waited - waited)
                metrics.STAGE_SECONDS.labels("fetch").observe(fetching)
                return data  # record_image_done counts this successful attempt

    async def finish_if_complete(self, request_id: uuid.UUID) -> None:
        """Finish a request whose images are all final: render the output CSV, mark it
        Completed or Failed, publish request.finished. Safe to call any number of times."""
        async with self.pool.acquire() as conn:
            counters = await queries.counters(conn, request_id)
            if counters is None or not counters.all_final:
                return
            if await queries.is_final(conn, request_id):
                return
            csv_key = keys.output_csv_key(request_id)
            await self.storage.put(csv_key, await self._render_csv(conn, request_id), "text/csv")
            finished = await queries.finish_request(conn, request_id, output_csv_key=csv_key)
        if finished is None:
            return  # another worker finished it first
        log.info(
            "request finished", extra={"request_id": str(request_id), "status": finished.status}
        )
        await self._announce(queries.Counters.of(finished))
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
            await self._announce(counters)
            if counters.all_final:
                await self.finish_if_complete(counters.request_id)
        return code, message

    async def _render_csv(self, conn: queries.Connection, request_id: uuid.UUID) -> bytes:
        out = io.BytesIO()
        writer = OutputCsvWriter(out)
        async for product in queries.iter_products(conn, request_id):
            writer.write_product(
                product.serial_number,
                product.product_name,
                [image.input_url for image in product.images],
                # Never signed URLs, which would expire in the stored file: in presigned mode
                # the gateway renders the CSV again when it is downloaded.
                [
                    self.storage.permanent_url(image.output_key) if image.output_key else None
                    for image in product.images
                ],
                [
                    (image.input_url, image.error_code or "")
                    for image in product.images
                    if image.status == "Failed"
                ],
                [image.ssim if image.status == "Done" else None for image in product.images],
                [(image.input_url, image.note) for image in product.images if image.note],
            )
        return out.getvalue()
