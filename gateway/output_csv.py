"""The output CSV download: the stored copy, or rendered at download time when output URLs
are presigned.

Signed URLs expire, so the copy the worker stored (which names each image by its permanent
`s3://` URL) is not what callers get: the rows are rendered again from the products the status
service lists, with URLs it signs as it reads them, and streamed a page at a time. The stored
copy is read from the store in pieces as the client takes them. Either way memory stays flat
whatever the size of the request, and a client that takes nothing for
IMGPIPE_DOWNLOAD_IDLE_TIMEOUT is cut off, so that what its download holds goes too.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator

import grpc
from aiohttp import web

from gateway.json_views import product_ssims
from gateway.keys import CHANNELS, SETTINGS
from services.common.csv_format import OutputCsvWriter
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb

log = logging.getLogger(__name__)

# Products per ListProducts call: a page of presigned URLs stays far below the gRPC message limit.
PAGE_SIZE = 500
# Bytes per write: aiohttp waits for the client to take each before the next (its transport's
# high-water mark is 64 KiB), so no more than this waits in the gateway per download.
PIECE = 64 * 1024


class Stalled(Exception):
    """The client took nothing for the idle timeout; its connection is dropped."""


async def send(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
    """Write `data` a PIECE at a time, each taken by the client within the idle timeout, or
    drop the connection and raise Stalled."""
    idle = request.app[SETTINGS].download_idle_timeout
    view = memoryview(data)
    for start in range(0, len(view), PIECE):
        try:
            async with asyncio.timeout(idle):
                await response.write(view[start : start + PIECE])
        except TimeoutError:
            log.warning("download stalled: connection dropped", extra={"idle_timeout": idle})
            if request.transport is not None:
                # Not close(), which would keep what is buffered until the client takes it.
                request.transport.abort()
            raise Stalled from None


async def send_stored_csv(
    request: web.Request, size: int, pieces: AsyncIterator[bytes], headers: dict[str, str]
) -> web.StreamResponse:
    """Answer with the stored output CSV, `size` bytes read from the store in `pieces`."""
    response = web.StreamResponse(headers=headers)
    response.content_type = "text/csv"
    response.charset = "utf-8"
    response.content_length = size
    await response.prepare(request)
    try:
        async for piece in pieces:
            await send(request, response, piece)
    except Stalled:
        return response
    await response.write_eof()
    return response


async def stream_output_csv(
    request: web.Request, request_id: str, headers: dict[str, str]
) -> web.StreamResponse:
    """Answer with the output CSV of the final request `request_id`, rendered now."""
    status, timeout = request.app[CHANNELS].status, request.app[SETTINGS].rpc_timeout

    async def page(token: str) -> status_pb.ListProductsResponse:
        return await status.ListProducts(
            status_pb.ListProductsRequest(
                request_id=request_id, page_size=PAGE_SIZE, page_token=token
            ),
            timeout=timeout,
        )

    # The first page before the headers: a failure here is still a JSON error answer.
    current = await page("")
    response = web.StreamResponse(headers=headers)
    response.content_type = "text/csv"
    response.charset = "utf-8"
    await response.prepare(request)
    out = io.BytesIO()
    writer = OutputCsvWriter(out)
    try:
        while True:
            for product in current.products:
                inputs = list(product.input_image_urls)
                outputs: list[str | None] = [url or None for url in product.output_image_urls]
                outputs += [None] * (len(inputs) - len(outputs))
                writer.write_product(
                    product.serial_number,
                    product.product_name,
                    inputs,
                    outputs,
                    [(error.url, error.code) for error in product.errors],
                    product_ssims(product),
                    [(url, note) for url, note in zip(inputs, product.notes, strict=False) if note],
                )
            await send(request, response, out.getvalue())
            out.seek(0)
            out.truncate()
            if not current.next_page_token:
                break
            current = await page(current.next_page_token)
    except Stalled:
        return response
    except grpc.aio.AioRpcError as exc:
        # The headers are sent: drop the connection before the last chunk, so the caller sees
        # an incomplete download instead of a CSV that looks whole but is short.
        log.warning("output CSV interrupted", extra={"grpc_code": exc.code().name})
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response
