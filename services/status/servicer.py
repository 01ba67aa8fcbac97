"""StatusService: reads from Postgres. Products are paged by keyset on their CSV row."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.config import MAX_WATCH_SECONDS
from services.common.db import lifecycle as lifecycle_db
from services.common.db import queries
from services.common.errors import Detail, InvalidArgument, NotFound, Unavailable
from services.common.grpc_auth import caller, caller_owner
from services.common.grpc_server import Register, wait_any
from services.common.image_options import from_json, to_proto
from services.common.limits import Limiter
from services.common.page_token import decode_page_token, encode_page_token
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.common.proto_convert import (
    FINAL_STATUSES,
    STATUS_TO_PROTO,
    counters_message,
    parse_request_id,
    timestamp,
)
from services.common.servicer_errors import rpc_method
from services.common.storage import Storage
from services.common.streams import DeadLetter, StreamNames, queue_stats
from services.status import lifecycle
from services.status.progress import ProgressHub
from services.status.webhook_secrets import OwnerSecret
from services.status.webhooks import WebhookDispatcher

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
# A page also ends once its products pass this size: products with many long URLs would
# otherwise make pages of tens of MiB, held several times over while the gateway renders them.
MAX_PAGE_BYTES = 1024 * 1024


class StatusServicer(status_grpc.StatusServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        storage: Storage,
        redis: aioredis.Redis | None = None,
        names: StreamNames | None = None,
        webhooks: WebhookDispatcher | None = None,
        hub: ProgressHub | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.pool = pool
        self.storage = storage
        self.redis = redis
        self.names = names or StreamNames()
        self.webhooks = webhooks
        self.hub = hub
        # Per-key limits (open streams); they apply to callers with an API key.
        self.limiter = limiter

    @rpc_method
    async def GetRequest(
        self, request: status_pb.GetRequestRequest, context: Context
    ) -> status_pb.GetRequestResponse:
        row = await self._load(request.request_id)
        return status_pb.GetRequestResponse(request=request_message(row))

    @rpc_method
    async def ListProducts(
        self, request: status_pb.ListProductsRequest, context: Context
    ) -> status_pb.ListProductsResponse:
        request_id = parse_request_id(request.request_id)
        page_size = _checked_page_size(request.page_size)
        after_row = decode_page_token(request.page_token)
        async with self.pool.acquire() as conn:
            if await lifecycle_db.visible_request(conn, request_id, caller_owner()) is None:
                raise NotFound(f"no request {request.request_id}")
            page = await queries.list_products(
                conn, request_id, after_row=after_row, limit=page_size + 1
            )
        # Output URLs are made now, one batch per page: presigned ones expire.
        keys = [i.output_key for p in page[:page_size] for i in p.images if i.output_key]
        urls = dict(zip(keys, await self.storage.public_urls(keys), strict=True))
        products: list[request_pb2.Product] = []
        size = 0
        for product in page[:page_size]:
            if products and size >= MAX_PAGE_BYTES:
                break
            products.append(self._product(product, urls))
            size += products[-1].ByteSize()
        more = len(page) > len(products)
        return status_pb.ListProductsResponse(
            products=products,
            next_page_token=encode_page_token(page[len(products) - 1].row_number) if more else "",
        )

    @rpc_method
    async def WatchRequest(
        self, request: status_pb.WatchRequestRequest, context: Context
    ) -> AsyncIterator[status_pb.WatchRequestResponse]:
        """The request now, then again whenever one of its images becomes final, then its
        final state; updates come from the progress hub, not from polling Postgres.

        A stream counts against the caller's `streams` limit while it is open, and ends after
        MAX_WATCH_SECONDS even if the request is not final: the client reconnects."""
        hub = self._hub()
        request_id = str(parse_request_id(request.request_id))
        ends_at = asyncio.get_running_loop().time() + MAX_WATCH_SECONDS
        async with self._hold_stream(), hub.watch(request_id) as watch:
            row = await self._load(request.request_id)  # after subscribing: nothing is missed
            current = request_message(row)
            yield status_pb.WatchRequestResponse(request=current)
            while row.status not in FINAL_STATUSES:
                left = ends_at - asyncio.get_running_loop().time()
                if left <= 0 or not await wait_any(watch.changed, timeout=left):
                    return
                event, stale = watch.take()
                final = event is not None and event.status in FINAL_STATUS_VALUES
                if stale or final or event is None:
                    # Re-read: the hub may have missed messages, or the final state has fields
                    # (completed_at, the output CSV) a progress message does not carry.
                    row = await self._load(request.request_id)
                    updated = request_message(row)
                elif _final_count(event.progress) < _final_count(current.progress):
                    continue  # workers publish after their commits, so messages can cross
                else:
                    updated = _apply(current, event, _rate_origin(row))
                if _changed(current, updated):
                    current = updated
                    yield status_pb.WatchRequestResponse(request=current)

    def _hold_stream(self) -> contextlib.AbstractAsyncContextManager[None]:
        if self.limiter is None:
            return contextlib.nullcontext()
        return self.limiter.hold_stream(caller())

    @rpc_method
    async def GetQueueStats(
        self, request: status_pb.GetQueueStatsRequest, context: Context
    ) -> status_pb.GetQueueStatsResponse:
        limit = min(request.dead_letter_limit or 20, 100)
        async with self.pool.acquire() as conn:
            backlog = await queries.backlog(conn)
            owners = await queries.backlog_by_owner(conn)
        response = status_pb.GetQueueStatsResponse(
            backlog_images=backlog,
            owners=[_owner_backlog(o) for o in owners],
            released_images=sum(o.released for o in owners),
        )
        if self.redis is None:
            return response
        stats = await queue_stats(self.redis, self.names, dead_letter_limit=limit)
        response.stream_length = stats.stream_length
        response.in_flight = stats.in_flight
        response.consumers = stats.consumers
        response.dead_letter_length = stats.dead_letter_length
        response.dead_letters.extend(_dead_letter(d) for d in await self._own(stats.dead_letters))
        return response

    @rpc_method
    async def ListWebhookDeliveries(
        self, request: status_pb.ListWebhookDeliveriesRequest, context: Context
    ) -> status_pb.ListWebhookDeliveriesResponse:
        row = await self._load(request.request_id)
        deliveries = await self._dispatcher().list_deliveries(row.id)
        return status_pb.ListWebhookDeliveriesResponse(deliveries=deliveries)

    @rpc_method
    async def RedeliverWebhook(
        self, request: status_pb.RedeliverWebhookRequest, context: Context
    ) -> status_pb.RedeliverWebhookResponse:
        row = await self._load(request.request_id)
        return status_pb.RedeliverWebhookResponse(delivery=await self._dispatcher().redeliver(row))

    @rpc_method
    async def GetWebhookSecret(
        self, request: status_pb.GetWebhookSecretRequest, context: Context
    ) -> status_pb.GetWebhookSecretResponse:
        secret = await self._dispatcher().secrets.current(self.pool, caller_owner())
        return status_pb.GetWebhookSecretResponse(secret=_secret_message(secret))

    @rpc_method
    async def RotateWebhookSecret(
        self, request: status_pb.RotateWebhookSecretRequest, context: Context
    ) -> status_pb.RotateWebhookSecretResponse:
        secret = await self._dispatcher().secrets.rotate(self.pool, caller_owner())
        return status_pb.RotateWebhookSecretResponse(secret=_secret_message(secret))

    @rpc_method
    async def ListRequests(
        self, request: status_pb.ListRequestsRequest, context: Context
    ) -> status_pb.ListRequestsResponse:
        page_size = _checked_page_size(request.page_size)
        rows, token = await lifecycle.list_page(
            self.pool, page_size=page_size, page_token=request.page_token, status=request.status
        )
        return status_pb.ListRequestsResponse(
            requests=[request_message(row) for row in rows], next_page_token=token
        )

    @rpc_method
    async def CancelRequest(
        self, request: status_pb.CancelRequestRequest, context: Context
    ) -> status_pb.CancelRequestResponse:
        row = await lifecycle.cancel(
            self.pool, self.redis, self.names, self.storage, request.request_id
        )
        return status_pb.CancelRequestResponse(request=request_message(row))

    @rpc_method
    async def DeleteRequest(
        self, request: status_pb.DeleteRequestRequest, context: Context
    ) -> status_pb.DeleteRequestResponse:
        if self.redis is None:
            raise Unavailable("deleting needs Redis, which this status service has not")
        deleted = await lifecycle.delete(
            self.pool, self.redis, self.names, self.storage, request.request_id
        )
        return status_pb.DeleteRequestResponse(
            objects_deleted=deleted.objects, bytes_deleted=deleted.bytes
        )

    def _hub(self) -> ProgressHub:
        if self.hub is None:
            raise Unavailable("live progress is not running in this status service")
        return self.hub

    def _dispatcher(self) -> WebhookDispatcher:
        if self.webhooks is None:
            raise Unavailable("webhook delivery is not running in this status service")
        return self.webhooks

    async def _load(self, raw_id: str) -> queries.RequestRow:
        request_id = parse_request_id(raw_id)
        async with self.pool.acquire() as conn:
            # Another owner's request, or one being deleted, is NOT_FOUND exactly like a
            # missing one, so ids cannot be probed.
            row = await lifecycle_db.visible_request(conn, request_id, caller_owner())
        if row is None:
            raise NotFound(f"no request {raw_id}")
        return row

    async def _own(self, dead: list[DeadLetter]) -> list[DeadLetter]:
        """The dead letters of the caller's own requests: the counts are the operators' view of
        the whole queue, but a dead letter names a request and an image URL."""
        ids: dict[str, uuid.UUID] = {}
        for letter in dead:
            with contextlib.suppress(ValueError):
                ids[letter.task.request_id] = uuid.UUID(letter.task.request_id)
        if not ids:
            return []
        async with self.pool.acquire() as conn:
            owned = await queries.owned_request_ids(conn, list(ids.values()), caller_owner())
        return [d for d in dead if ids.get(d.task.request_id) in owned]

    def _product(
        self, product: queries.ProductWithImages, urls: dict[str, str]
    ) -> request_pb2.Product:
        """`product` as a message; `urls` maps its output keys to their public URLs."""
        return request_pb2.Product(
            serial_number=product.serial_number,
            product_name=product.product_name,
            row_number=product.row_number,
            input_image_urls=[i.input_url for i in product.images],
            output_image_urls=[urls[i.output_key] if i.output_key else "" for i in product.images],
            errors=[
                request_pb2.ImageError(
                    url=i.input_url, code=i.error_code or "", message=i.error_message or ""
                )
                for i in product.images
                if i.status == "Failed"
            ],
            input_bytes=[i.bytes_in or 0 if i.status == "Done" else 0 for i in product.images],
            output_bytes=[i.bytes_out or 0 if i.status == "Done" else 0 for i in product.images],
            ssim=[i.ssim or 0.0 if i.status == "Done" else 0.0 for i in product.images],
            quality=[i.quality or 0 if i.status == "Done" else 0 for i in product.images],
            notes=[i.note or "" if i.status == "Done" else "" for i in product.images],
        )


def _owner_backlog(backlog: queries.OwnerBacklog) -> status_pb.OwnerBacklog:
    """One owner's backlog as the caller may see it: counts for everyone, the name only for
    the caller's own (other owners' names are not the caller's business)."""
    yours = backlog.owner == caller_owner()
    return status_pb.OwnerBacklog(
        owner=backlog.owner if yours else "",
        yours=yours,
        requests=backlog.requests,
        waiting_images=backlog.waiting,
        released_images=backlog.released,
    )


def _checked_page_size(page_size: int) -> int:
    """`page_size` of a list call, 0 meaning the default; more than MAX_PAGE_SIZE is refused."""
    if page_size > MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be at most {MAX_PAGE_SIZE}",
            [Detail(f"at most {MAX_PAGE_SIZE}", "page_size")],
        )
    return page_size or DEFAULT_PAGE_SIZE


def _rate_origin(row: queries.RequestRow) -> datetime:
    """Where a request's rate is measured from: its first task's release (docs/scheduling.md),
    so its images/s is its own share of the workers, not diluted by a wait for its turn."""
    return row.started_at or row.created_at


def progress_message(
    counts: request_pb2.Progress, started_at: datetime, final: bool, now: datetime | None = None
) -> request_pb2.Progress:
    """Progress with percent, the request's own observed rate since its first task was released,
    and the ETA at that rate."""
    done = counts.images_done + counts.images_failed
    total = counts.images_total
    elapsed = ((now or datetime.now(UTC)) - started_at).total_seconds()
    rate = done / elapsed if done and elapsed > 0 else 0.0
    progress = request_pb2.Progress(
        images_total=total,
        images_done=counts.images_done,
        images_failed=counts.images_failed,
        percent=round(100.0 * done / total, 1) if total else 100.0,
        bytes_in=counts.bytes_in,
        bytes_out=counts.bytes_out,
        images_per_second=round(rate, 2),
    )
    if counts.HasField("mean_ssim"):
        progress.mean_ssim = counts.mean_ssim
    if rate > 0 and not final:
        progress.eta_seconds = round((total - done) / rate, 1)
    return progress


def request_message(row: queries.RequestRow) -> request_pb2.Request:
    counts = counters_message(queries.Counters.of(row))
    return request_pb2.Request(
        request_id=str(row.id),
        status=STATUS_TO_PROTO[row.status],
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        completed_at=timestamp(row.completed_at) if row.completed_at else None,
        # A final request's rate is over its whole run, not diluted by the time since.
        progress=progress_message(
            counts, _rate_origin(row), row.status in FINAL_STATUSES, now=row.completed_at
        ),
        products_total=row.products_total,
        options=to_proto(from_json(row.options)),
        webhook_url=row.webhook_url or "",
        output_csv_key=row.output_csv_key or "",
    )


FINAL_STATUS_VALUES = frozenset(STATUS_TO_PROTO[status] for status in FINAL_STATUSES)


def _apply(
    current: request_pb2.Request, event: request_pb2.RequestEvent, started_at: datetime
) -> request_pb2.Request:
    """`current` updated with a progress event's status and counters."""
    updated = request_pb2.Request()
    updated.CopyFrom(current)
    updated.status = event.status
    updated.updated_at.CopyFrom(event.occurred_at)
    updated.progress.CopyFrom(progress_message(event.progress, started_at, final=False))
    return updated


def _final_count(progress: request_pb2.Progress) -> int:
    return progress.images_done + progress.images_failed


def _changed(before: request_pb2.Request, after: request_pb2.Request) -> bool:
    return (before.status, before.progress.images_done, before.progress.images_failed) != (
        after.status,
        after.progress.images_done,
        after.progress.images_failed,
    )


def _dead_letter(dead: DeadLetter) -> status_pb.DeadLetter:
    return status_pb.DeadLetter(
        entry_id=dead.entry_id,
        request_id=dead.task.request_id,
        image_id=dead.task.image_id,
        input_url=dead.task.input_url,
        error_code=dead.error_code,
        error_message=dead.error_message,
        deliveries=dead.deliveries,
        dead_at=Timestamp(seconds=dead.dead_at),
    )


def _secret_message(secret: OwnerSecret) -> status_pb.WebhookSecret:
    message = status_pb.WebhookSecret(
        owner=secret.owner, secret=secret.secret, generation=secret.generation
    )
    if secret.previous is not None and secret.previous_until is not None:
        message.previous_secret = secret.previous
        message.previous_generation = secret.generation - 1
        message.previous_expires_at.CopyFrom(timestamp(secret.previous_until))
    if secret.rotated_at is not None:
        message.rotated_at.CopyFrom(timestamp(secret.rotated_at))
    return message


def registrar(servicer: StatusServicer) -> Register:
    return lambda server: status_grpc.add_StatusServiceServicer_to_server(servicer, server)
