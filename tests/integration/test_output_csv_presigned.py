"""The gateway's output CSV when URLs are presigned: rendered from the status service's pages.

A stand-in StatusService answers on 127.0.0.1; the gateway's S3 store is never contacted
(in presigned mode the download does not read the stored copy).
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp.test_utils import TestClient

from gateway import output_csv
from gateway.app import create_app
from gateway.config import GatewaySettings
from services.common.csv_format import OUTPUT_COLUMNS
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.common.storage import S3Options, StorageConfig
from testing.gateway import GatewayServer
from testing.ports import free_tcp_port

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]
REQUEST_ID = "6c0f0000-0000-4000-8000-000000000001"


def product(number: int) -> request_pb2.Product:
    inputs = [f"https://shop.example/{number}/a.jpg", f"https://shop.example/{number}/b.jpg"]
    signed = f"http://s3.test/b/requests/{REQUEST_ID}/images/{number}.jpg?X-Amz-Signature=f00"
    failed = number % 2 == 1  # odd products lose their second image
    return request_pb2.Product(
        serial_number=str(number),
        product_name=f"=Product {number}",  # neutralised like the stored CSV
        input_image_urls=inputs,
        output_image_urls=[signed, "" if failed else signed],
        errors=[request_pb2.ImageError(url=inputs[1], code="HTTP_STATUS")] if failed else [],
        ssim=[0.98765, 0.0 if failed else 0.5],
        quality=[50, 0 if failed else 30],
        notes=["", "" if failed else "TARGET_NOT_MET"],
    )


@dataclass
class FakeStatus(status_grpc.StatusServiceServicer):
    products: list[request_pb2.Product]
    status: request_pb2.RequestStatus.ValueType = request_pb2.REQUEST_STATUS_COMPLETED
    pages_before_failing: int | None = None
    asked: list[tuple[int, str]] = field(default_factory=list)

    async def GetRequest(
        self, request: status_pb.GetRequestRequest, context: Any
    ) -> status_pb.GetRequestResponse:
        found = request_pb2.Request(
            request_id=request.request_id,
            status=self.status,
            output_csv_key=f"requests/{request.request_id}/output.csv",
        )
        return status_pb.GetRequestResponse(request=found)

    async def ListProducts(
        self, request: status_pb.ListProductsRequest, context: Any
    ) -> status_pb.ListProductsResponse:
        if self.pages_before_failing is not None and len(self.asked) >= self.pages_before_failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "status went away")
        self.asked.append((request.page_size, request.page_token))
        start = int(request.page_token or 0)
        end = start + request.page_size
        more = end < len(self.products)
        return status_pb.ListProductsResponse(
            products=self.products[start:end], next_page_token=str(end) if more else ""
        )


@pytest.fixture
async def status() -> AsyncIterator[tuple[FakeStatus, str]]:
    # Only the two calls a download makes; the others answer UNIMPLEMENTED by default.
    servicer = FakeStatus([product(n) for n in range(1, 6)])  # type: ignore[abstract]
    server = grpc.aio.server()
    status_grpc.add_StatusServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def client(
    status: tuple[FakeStatus, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Client]:
    monkeypatch.setattr(output_csv, "PAGE_SIZE", 2)  # five products: three pages
    nowhere = S3Options(endpoint=f"http://127.0.0.1:{free_tcp_port()}", access_key_id="k")
    settings = GatewaySettings(
        ingest_addr=f"127.0.0.1:{free_tcp_port()}",
        status_addr=status[1],
        storage=StorageConfig("s3://bucket", presign_expiry=3600, s3=nowhere),
        rpc_timeout=5,
    )
    async with TestClient(GatewayServer(create_app(settings), host="127.0.0.1")) as each:
        yield each


async def test_the_csv_is_rendered_from_every_page_of_products(
    client: Client, status: tuple[FakeStatus, str]
) -> None:
    async with client.get(f"/requests/{REQUEST_ID}/output.csv") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
        assert response.headers["Content-Disposition"] == (
            f'attachment; filename="imgpipe-{REQUEST_ID}.csv"'
        )
        body = await response.read()

    assert status[0].asked == [(2, ""), (2, "2"), (2, "4")]
    rows = list(csv.reader(io.StringIO(body.decode())))
    assert rows[0] == list(OUTPUT_COLUMNS)
    assert [row[0] for row in rows[1:]] == ["1", "2", "3", "4", "5"]
    assert rows[1][1] == "'=Product 1"
    signed = f"http://s3.test/b/requests/{REQUEST_ID}/images/1.jpg?X-Amz-Signature=f00"
    assert rows[1][3:] == [f"{signed},", "https://shop.example/1/b.jpg: HTTP_STATUS", "0.9877,"]
    assert rows[2][4:] == ["https://shop.example/2/b.jpg: TARGET_NOT_MET", "0.9877,0.5000"]
    assert body.endswith(b"\r\n")


async def test_a_request_still_running_has_no_csv_yet(
    client: Client, status: tuple[FakeStatus, str]
) -> None:
    status[0].status = request_pb2.REQUEST_STATUS_PROCESSING
    async with client.get(f"/requests/{REQUEST_ID}/output.csv") as response:
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "conflict"
    assert status[0].asked == []


async def test_status_failing_before_the_first_row_is_a_json_error(
    client: Client, status: tuple[FakeStatus, str]
) -> None:
    status[0].pages_before_failing = 0
    async with client.get(f"/requests/{REQUEST_ID}/output.csv") as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "unavailable"


async def test_status_failing_mid_download_cuts_the_transfer_short(
    client: Client, status: tuple[FakeStatus, str]
) -> None:
    status[0].pages_before_failing = 2
    async with client.get(f"/requests/{REQUEST_ID}/output.csv") as response:
        assert response.status == 200
        # Never a CSV that looks whole: the chunked body ends without its last chunk.
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
