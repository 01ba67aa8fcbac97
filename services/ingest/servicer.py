"""IngestService: validate a CSV (or structured products) as it streams in, store it, and wake
the feeder, which puts the tasks on the stream in fair turns (services/ingest/feeder.py).

A request is accepted whole or rejected whole. Rows are validated as they arrive and kept on
disk (`spool.py`), so memory stays flat however large the file and no Postgres connection waits
on a slow client; once the upload is whole they are written in one transaction, which any
validation problem rolls back: the caller gets every problem found (up to the limit) with row
and column. Each key has at most `uploads=` uploads being received at a time (limits.py).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import redis.asyncio as aioredis

from services.common import failpoints, initial_metadata, tracing
from services.common.auth import Principal
from services.common.csv_format import (
    REQUIRED_COLUMNS,
    CsvLimits,
    CsvReader,
    duplicate_serial,
)
from services.common.db import queries
from services.common.errors import (
    Conflict,
    Detail,
    InvalidArgument,
    InvalidCsv,
    NotFound,
    TooLarge,
    Unavailable,
)
from services.common.fetch import FetchAllow, FetchLimits, refused_before_dns
from services.common.grpc_auth import caller, caller_owner
from services.common.grpc_server import Register
from services.common.image_options import ImageOptions, from_proto, to_json
from services.common.limits import ImageReservation, Limiter
from services.common.pb.imgpipe.v1 import (
    ingest_service_pb2 as ingest_pb,
)
from services.common.pb.imgpipe.v1 import (
    ingest_service_pb2_grpc as ingest_grpc,
)
from services.common.pb.imgpipe.v1 import (
    request_pb2,
)
from services.common.proto_convert import STATUS_TO_PROTO, parse_request_id
from services.common.servicer_errors import rpc_method
from services.ingest.config import CSV_LIMIT_SETTINGS
from services.ingest.spool import Spool

log = logging.getLogger(__name__)

# Times a keyed retry charges again because more images failed between its count and its
# transaction (a request still running); then it answers UNAVAILABLE, to be tried again.
RETRY_CHARGE_TRIES = 3

INSERT_BATCH = 500
ANALYZE_AFTER_PRODUCTS = 5_000
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class Header:
    options: ImageOptions
    webhook_url: str | None
    idempotency_key: str | None


class IngestServicer(ingest_grpc.IngestServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        names: Any,
        limits: CsvLimits,
        limiter: Limiter | None = None,
        *,
        fetch_allow: FetchAllow | None = None,
        fetch_ports: frozenset[int] = FetchLimits().allowed_ports,
        wake_feeder: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.redis = redis
        self.names = names
        self.limits = limits
        # Per-key limits (concurrent requests, images per day); they apply to callers that
        # authenticated with an API key, so not when authentication is off.
        self.limiter = limiter
        # The status service's fetch guard, to refuse a webhook_url it would never contact.
        self.fetch_allow = fetch_allow or FetchAllow()
        self.fetch_ports = fetch_ports
        # Committed images wait in Postgres; the feeder releases them to the stream in turns.
        self.wake_feeder = wake_feeder

    @rpc_method
    async def UploadCsv(
        self, request_iterator: AsyncIterator[ingest_pb.UploadCsvRequest], context: Context
    ) -> ingest_pb.UploadCsvResponse:
        header = await self._header(request_iterator)
        accepted = await self._accept_upload(
            header, _content(request_iterator, "chunk", len), context
        )
        return ingest_pb.UploadCsvResponse(accepted=accepted)

    @rpc_method
    async def SubmitProducts(
        self, request_iterator: AsyncIterator[ingest_pb.SubmitProductsRequest], context: Context
    ) -> ingest_pb.SubmitProductsResponse:
        header = await self._header(request_iterator)

        # Structured products go through the very same reader as CSV uploads, so both paths
        # share every validation rule, limit and row number (the first product is row 2).
        async def as_csv() -> AsyncIterator[bytes]:
            yield _csv_line(REQUIRED_COLUMNS)
            async for p in _content(request_iterator, "product", lambda _: 1):
                yield _csv_line((p.serial_number, p.product_name, ",".join(p.input_image_urls)))

        accepted = await self._accept_upload(header, as_csv(), context)
        return ingest_pb.SubmitProductsResponse(accepted=accepted)

    @rpc_method
    async def RetryFailedImages(
        self, request: ingest_pb.RetryFailedImagesRequest, context: Context
    ) -> ingest_pb.RetryFailedImagesResponse:
        request_id = parse_request_id(request.request_id)
        principal = caller()
        # A retry reopens the request: it takes a slot again (its own, if it still has one).
        await self._take_slot(principal, request_id)
        async with self.pool.acquire() as conn:
            try:
                batch = await self._reopen(conn, principal, request_id)
                if batch is None:
                    raise NotFound(f"no request {request.request_id}")
                if isinstance(batch, queries.BeingCancelled):
                    raise Conflict(
                        f"request {request.request_id} is being cancelled: retry it once it is"
                        " Cancelled"
                    )
            except BaseException:
                await self._give_back_slot(principal, request_id)
                raise
        self.wake_feeder()  # the images are waiting again, in their request's turn
        log.info(
            "retrying failed images",
            extra={"request_id": str(request_id), "images": batch.retried},
        )
        return ingest_pb.RetryFailedImagesResponse(
            request_id=str(request_id),
            status=STATUS_TO_PROTO[batch.request.status],
            images_retried=batch.retried,
        )

    async def _reopen(
        self, conn: queries.Connection, principal: Principal | None, request_id: uuid.UUID
    ) -> queries.RetryBatch | queries.BeingCancelled | None:
        """Put the failed images back to Pending, charged to today's `images_per_day` like an
        upload's: every retried image is fetched again from its origin.

        Charged first, so a retry over the limit changes nothing, and outside the retry's
        transaction, which holds the request's row and its failed images' (300,000 at the size
        limit) and so must not wait on Redis meanwhile: workers recording the request's images
        would wait with it. The charge is for the images Failed before the transaction; if
        more failed since (the request is still running), it is taken again for the new
        count, and if fewer (a retry at the same time took some), the rest is given back."""
        owner, traceparent = caller_owner(), tracing.current_traceparent()
        if principal is None or self.limiter is None:
            result = await queries.retry_failed_images(
                conn, request_id, owner=owner, traceparent=traceparent
            )
            assert not isinstance(result, queries.MoreFailed), "no `most` given"
            return result
        failed = await queries.failed_images(conn, request_id, owner=owner)
        for _ in range(RETRY_CHARGE_TRIES):
            if failed is None:
                return None
            reservation = await self.limiter.take_images(principal, failed)
            try:
                result = await queries.retry_failed_images(
                    conn, request_id, owner=owner, traceparent=traceparent, most=failed
                )
            except BaseException:
                await self.limiter.give_back_images(reservation)
                raise
            if isinstance(result, queries.MoreFailed):
                await self.limiter.give_back_images(reservation)
                failed = result.failed
                continue
            retried = result.retried if isinstance(result, queries.RetryBatch) else 0
            if reservation is not None and retried < failed:
                await self.limiter.give_back_images(
                    dataclasses.replace(reservation, count=failed - retried)
                )
            return result
        raise Unavailable("the request's images kept failing while it was retried; try again")

    async def _header(self, messages: AsyncIterator[Any]) -> Header:
        first = await anext(aiter(messages), None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first message must be the upload header")
        pb = first.header
        options = from_proto(pb.options)
        problems = [Detail(message=m, column="options") for m in options.validate()]
        webhook_url = pb.webhook_url.strip() or None
        if webhook_url is not None:
            problem = self._webhook_url_problem(webhook_url)
            if problem is not None:
                problems.append(Detail(message=problem, column="webhook_url"))
        key = pb.idempotency_key.strip()
        if len(key) > 255 or not key.isprintable():
            problems.append(
                Detail(
                    message="an Idempotency-Key is at most 255 printable characters",
                    column="idempotency_key",
                )
            )
        if problems:
            raise InvalidArgument("invalid upload options", problems)
        return Header(options, webhook_url, key or None)

    def _webhook_url_problem(self, url: str) -> str | None:
        """Why `url` can never receive a webhook, when that is known without DNS: not http(s),
        credentials in it, a port or an IP literal the fetch guard refuses."""
        if not _is_http_url(url):
            return "webhook_url must be an absolute http(s) URL"
        refused = refused_before_dns(url, self.fetch_allow, self.fetch_ports)
        return f"webhook_url is refused: {refused}" if refused is not None else None

    async def _accept_upload(
        self, header: Header, chunks: AsyncIterator[bytes], context: Context
    ) -> ingest_pb.Accepted:
        owner = caller_owner()  # '' when authentication is off
        principal = caller()
        request_id = uuid.uuid4()
        tracing.set_request_id(str(request_id))  # for this call's log lines
        async with self._receiving(principal):
            # Every refusal that needs no file is behind us: ask for the file.
            await initial_metadata.ready(context)
            with Spool(self.limits) as spool:
                # The whole upload first, with no connection held: a client that stalls holds a
                # temporary file and one of its own `uploads=` leases, nothing others need.
                await spool.receive(chunks)
                if spool.reader.exceeded is not None:
                    raise self._too_large(spool.reader)
                stored = await self._store_or_replay(request_id, owner, header, spool)
        if isinstance(stored, ingest_pb.Accepted):
            return stored  # an idempotent replay: nothing new was stored
        products, images = stored
        failpoints.crash_here("ingest.after_commit")
        if products >= ANALYZE_AFTER_PRODUCTS:
            # A large request arrives all at once, before autovacuum's statistics notice it;
            # stale statistics make the planner sort the whole request for every status page.
            async with self.pool.acquire() as conn:
                await queries.refresh_statistics(conn)
        log.info(
            "accepted",
            extra={"request_id": str(request_id), "products": products, "images": images},
        )
        self.wake_feeder()
        return ingest_pb.Accepted(
            request_id=str(request_id),
            status=request_pb2.REQUEST_STATUS_PENDING,
            products=products,
            images=images,
            created=True,
        )

    async def _store_or_replay(
        self, request_id: uuid.UUID, owner: str, header: Header, spool: Spool
    ) -> tuple[int, int] | ingest_pb.Accepted:
        """Store a received upload: (products, images), or the earlier request with the same
        Idempotency-Key, replayed."""
        key = header.idempotency_key
        if not key:
            async with self.pool.acquire() as conn:
                return await self._store_within_limits(conn, request_id, owner, header, spool)
        # Uploads with the same key take turns on one connection, so two identical ones sent
        # at once make one request: the second waits, then finds the first and replays it.
        async with queries.idempotency_lock(self.pool, owner, key) as conn:
            existing = await queries.find_idempotent(conn, owner, key)
            if existing is None:
                return await self._store_within_limits(conn, request_id, owner, header, spool)
        tracing.set_request_id(str(existing.id))
        return _replay(existing, spool.digest.digest())

    def _receiving(self, principal: Principal | None) -> AbstractAsyncContextManager[None]:
        """One of the caller's `uploads=` leases while its upload is received and stored."""
        if principal is None or self.limiter is None:
            return contextlib.nullcontext()
        return self.limiter.upload_lease(principal)

    async def _store_within_limits(
        self,
        conn: queries.Connection,
        request_id: uuid.UUID,
        owner: str,
        header: Header,
        spool: Spool,
    ) -> tuple[int, int]:
        """Write a received upload in one transaction on `conn`; nothing in it waits on the
        client. The caller's limits are taken first (a slot) and last (today's images, once
        the count is known, before the commit); both are given back if the upload is refused
        or fails."""
        principal = caller()
        if principal is not None and self.limiter is not None:
            await self.limiter.check_images_left(principal)
        await self._take_slot(principal, request_id)
        # Filled just before the commit, so a failed commit gives the images back too.
        reserved: list[ImageReservation] = []
        try:
            return await self._insert_rows(conn, request_id, owner, header, spool, reserved)
        except BaseException:
            await self._give_back_slot(principal, request_id)
            if self.limiter is not None:
                for reservation in reserved:
                    await self.limiter.give_back_images(reservation)
            raise

    async def _take_slot(self, principal: Principal | None, request_id: uuid.UUID) -> None:
        if principal is not None and self.limiter is not None:
            await self.limiter.take_slot(principal, request_id)

    async def _give_back_slot(self, principal: Principal | None, request_id: uuid.UUID) -> None:
        if principal is not None and self.limiter is not None:
            await self.limiter.give_back_slot(principal, request_id)

    async def _insert_rows(
        self,
        conn: queries.Connection,
        request_id: uuid.UUID,
        owner: str,
        header: Header,
        spool: Spool,
        reserved: list[ImageReservation],
    ) -> tuple[int, int]:
        principal = caller()
        reader = spool.reader
        products = images = 0
        async with conn.transaction():
            await queries.insert_request(
                conn,
                request_id,
                options=to_json(header.options),
                webhook_url=header.webhook_url,
                owner=owner,
                idempotency_key=header.idempotency_key,
                traceparent=tracing.current_traceparent(),
            )
            # Valid rows are stored even after a problem (the transaction is rolled back
            # then): the duplicate check below sees them all.
            for batch in spool.batches():
                images += await queries.insert_products(conn, request_id, batch)
                products += len(batch)
            most = self.limits.max_problems
            duplicates = [
                duplicate_serial(*found)
                for found in await queries.duplicate_serials(conn, request_id, limit=most + 1)
            ]
            if not reader.ok or duplicates:
                problems = sorted([*reader.problems, *duplicates], key=lambda p: p.row)
                truncated = reader.truncated or len(problems) > most
                raise InvalidCsv(
                    f"the CSV has {min(len(problems), most)}{'+' if truncated else ''} problem(s)",
                    [Detail(p.message, p.column, p.row) for p in problems[:most]],
                )
            if principal is not None and self.limiter is not None:
                reservation = await self.limiter.take_images(principal, images)
                if reservation is not None:
                    reserved.append(reservation)
            # A URL repeated in the request is fetched and compressed once (its first image).
            await queries.link_repeated_urls(conn, request_id)
            await queries.complete_request_insert(
                conn,
                request_id,
                products_total=products,
                images_total=images,
                content_hash=spool.digest.digest(),
            )
        return products, images

    def _too_large(self, reader: CsvReader) -> TooLarge:
        """413: the CSV went over a size limit, named with its setting and value."""
        field = reader.exceeded or ""
        setting, unit = CSV_LIMIT_SETTINGS[field]
        return TooLarge(
            f"the CSV exceeds {setting}={getattr(self.limits, field)} {unit}",
            [Detail(p.message, p.column, p.row) for p in reader.problems],
        )


async def _content(
    messages: AsyncIterator[Any], field: str, measure: Callable[[Any], int]
) -> AsyncIterator[Any]:
    """The `field` payloads of an upload, which must end with an UploadEnd that counts them.

    Raising at the end of the stream refuses the upload before anything is stored: when a client
    cancels mid-upload, grpc ends the request iterator quietly, as if it were complete.
    """
    count = 0
    async for message in messages:
        kind = message.WhichOneof("payload")
        if kind == "end":
            if message.end.count != count:
                raise InvalidArgument(
                    f"UploadEnd counts {message.end.count} but {count} arrived; "
                    "the upload is incomplete"
                )
            async for _ in messages:
                raise InvalidArgument("nothing may follow UploadEnd")
            return
        if kind != field:
            raise InvalidArgument(f"expected a {field} or UploadEnd message, got {kind}")
        payload = getattr(message, field)
        count += measure(payload)
        yield payload
    raise InvalidArgument("the upload ended without UploadEnd; nothing was stored")


def _replay(existing: queries.ExistingRequest, content_hash: bytes) -> ingest_pb.Accepted:
    if existing.content_hash != content_hash:
        raise Conflict("this Idempotency-Key was used for a different upload")
    return ingest_pb.Accepted(
        request_id=str(existing.id),
        status=STATUS_TO_PROTO[existing.status],
        products=existing.products_total,
        images=existing.images_total,
        created=False,
    )


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _csv_line(cells: tuple[str, ...]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(cells)
    return out.getvalue().encode()


def registrar(servicer: IngestServicer) -> Register:
    return lambda server: ingest_grpc.add_IngestServiceServicer_to_server(servicer, server)
