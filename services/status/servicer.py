"""StatusService: reads from Postgres. Products are paged by keyset on their CSV row."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.db import queries
from services.common.errors import Detail, InvalidArgument, NotFound, Unavailable, rpc_method
from services.common.grpc_server import Register
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.common.proto_convert import (
    FINAL_STATUSES,
    STATUS_TO_PROTO,
    from_json,
    parse_request_id,
    to_proto,
)
from services.common.storage import Storage
from services.common.streams import DeadLetter, StreamNames, queue_stats
from services.status.webhooks import WebhookDispatcher

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
WATCH_INTERVAL = 0.5


class StatusServicer(status_grpc.StatusServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        storage: Storage,
        redis: aioredis.Redis | None = None,
        names: StreamNames | None = None,
        webhooks: WebhookDispatcher | None = None,
    ) -> None:
        self.pool = pool
        self.storage = storage
        self.redis = redis
        self.names = names or StreamNames()
        self.webhooks = webhooks

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
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be at most {MAX_PAGE_SIZE}",
                [Detail(f"at most {MAX_PAGE_SIZE}", "page_size")],
            )
        after_row = _decode_token(request.page_token)
        async with self.pool.acquire() as conn:
            if await queries.get_request(conn, request_id) is None:
                raise NotFound(f"no request {request.request_id}")
            page = await queries.list_products(
                conn, request_id, after_row=after_row, limit=page_size + 1
            )
        more = len(page) > page_size
        page = page[:page_size]
        return status_pb.ListProductsResponse(
            products=[self._product(p) for p in page],
            next_page_token=_encode_token(page[-1].row_number) if more else "",
        )

    @rpc_method
    async def WatchRequest(
        self, request: status_pb.WatchRequestRequest, context: Context
    ) -> AsyncIterator[status_pb.WatchRequestResponse]:
        # Polls Postgres while the request is open; the Redis fan-out comes with live progress.
        last: tuple[Any, ...] | None = None
        while True:
            row = await self._load(request.request_id)
            seen = (row.status, row.images_done, row.images_failed)
            if seen != last:
                last = seen
                yield status_pb.WatchRequestResponse(request=request_message(row))
            if row.status in FINAL_STATUSES:
                return
            await asyncio.sleep(WATCH_INTERVAL)

    @rpc_method
    async def GetQueueStats(
        self, request: status_pb.GetQueueStatsRequest, context: Context
    ) -> status_pb.GetQueueStatsResponse:
        limit = min(request.dead_letter_limit or 20, 100)
        async with self.pool.acquire() as conn:
            backlog = await queries.backlog(conn)
        if self.redis is None:
            return status_pb.GetQueueStatsResponse(backlog_images=backlog)
        stats = await queue_stats(self.redis, self.names, dead_letter_limit=limit)
        return status_pb.GetQueueStatsResponse(
            backlog_images=backlog,
            stream_length=stats.stream_length,
            in_flight=stats.in_flight,
            consumers=stats.consumers,
            dead_letter_length=stats.dead_letter_length,
            dead_letters=[_dead_letter(d) for d in stats.dead_letters],
        )

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

    def _dispatcher(self) -> WebhookDispatcher:
        if self.webhooks is None:
            raise Unavailable("webhook delivery is not running in this status service")
        return self.webhooks

    async def _load(self, raw_id: str) -> queries.RequestRow:
        request_id = parse_request_id(raw_id)
        async with self.pool.acquire() as conn:
            row = await queries.get_request(conn, request_id)
        if row is None:
            raise NotFound(f"no request {raw_id}")
        return row

    def _product(self, product: queries.ProductWithImages) -> request_pb2.Product:
        return request_pb2.Product(
            serial_number=product.serial_number,
            product_name=product.product_name,
            row_number=product.row_number,
            input_image_urls=[i.input_url for i in product.images],
            output_image_urls=[
                self.storage.public_url(i.output_key) if i.output_key else ""
                for i in product.images
            ],
            errors=[
                request_pb2.ImageError(
                    url=i.input_url, code=i.error_code or "", message=i.error_message or ""
                )
                for i in product.images
                if i.status == "Failed"
            ],
        )


def request_message(row: queries.RequestRow) -> request_pb2.Request:
    final = row.images_done + row.images_failed
    return request_pb2.Request(
        request_id=str(row.id),
        status=STATUS_TO_PROTO[row.status],
        created_at=_timestamp(row.created_at),
        updated_at=_timestamp(row.updated_at),
        completed_at=_timestamp(row.completed_at) if row.completed_at else None,
        progress=request_pb2.Progress(
            images_total=row.images_total,
            images_done=row.images_done,
            images_failed=row.images_failed,
            percent=round(100.0 * final / row.images_total, 1) if row.images_total else 100.0,
            bytes_in=row.bytes_in,
            bytes_out=row.bytes_out,
        ),
        products_total=row.products_total,
        options=to_proto(from_json(row.options)),
        webhook_url=row.webhook_url or "",
        output_csv_key=row.output_csv_key or "",
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


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _encode_token(after_row: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{after_row}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, _, after = text.partition(":")
        if version != "v1" or not after.isdigit():
            raise ValueError(text)
        return int(after)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(
            "page_token is not valid", [Detail("not a token from this API", "page_token")]
        ) from None


def registrar(servicer: StatusServicer) -> Register:
    return lambda server: status_grpc.add_StatusServiceServicer_to_server(servicer, server)
