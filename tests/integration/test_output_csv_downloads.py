"""The stored output CSV download (a file:// store): read from the store a piece at a time as
the client takes it, cut off when the client takes nothing for IMGPIPE_DOWNLOAD_IDLE_TIMEOUT,
and at most IMGPIPE_GATEWAY_DOWNLOADS at a time per caller. A client that stopped reading
used to keep the whole CSV in the gateway, as long as its connection stayed open.

A stand-in StatusService answers GetRequest on 127.0.0.1 (tests/integration/
test_output_csv_presigned.py); the store is a folder of the test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.keys import DOWNLOADS
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.common.storage import S3Options, StorageConfig
from testing.gateway import GatewayServer
from testing.grpc_servers import on_loopback
from testing.polling import wait_until_async
from testing.ports import free_tcp_port
from tests.integration.test_output_csv_presigned import REQUEST_ID, FakeStatus

pytestmark = pytest.mark.integration

Client = TestClient[Any, Any]
PATH = f"/requests/{REQUEST_ID}/output.csv"
# More than a loopback connection's socket buffers hold, so a client that reads nothing stalls
# the download.
SIZE = 24 * 1024 * 1024
CALLER = "address 127.0.0.1"


@contextlib.asynccontextmanager
async def status_server(products: list[request_pb2.Product]) -> AsyncIterator[str]:
    """A stand-in StatusService listing `products`; its address."""
    servicer = FakeStatus(products)  # type: ignore[abstract]
    async with on_loopback(
        functools.partial(status_grpc.add_StatusServiceServicer_to_server, servicer)
    ) as address:
        yield address


@pytest.fixture
async def status_addr() -> AsyncIterator[str]:
    async with status_server([]) as address:
        yield address


@pytest.fixture
def stored(tmp_path: Path) -> bytes:
    """The request's stored output CSV: a header, then rows up to SIZE bytes."""
    header = b"S. No.,Product Name,Input Image Urls,Output Image Urls\r\n"
    row = b"1,Shoe,https://shop.example/a.jpg,file:///out/a.jpg\r\n"
    data = header + row * ((SIZE - len(header)) // len(row))
    path = tmp_path / "store" / "requests" / REQUEST_ID / "output.csv"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return data


@pytest.fixture
async def client(tmp_path: Path, status_addr: str, stored: bytes) -> AsyncIterator[Client]:
    settings = GatewaySettings(
        ingest_addr=f"127.0.0.1:{free_tcp_port()}",
        status_addr=status_addr,
        storage=StorageConfig((tmp_path / "store").as_uri()),
        rpc_timeout=5,
        downloads=1,
        download_idle_timeout=0.5,
    )
    async with TestClient(GatewayServer(create_app(settings), host="127.0.0.1")) as each:
        yield each


@contextlib.asynccontextmanager
async def stalled_download(client: Client) -> AsyncIterator[asyncio.StreamReader]:
    """A download whose client sends its GET, then reads nothing (a small receive window)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", client.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    writer.write(f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    try:
        yield reader
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_the_stored_csv_is_sent_whole_with_its_length(client: Client, stored: bytes) -> None:
    async with client.get(PATH) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
        assert int(response.headers["Content-Length"]) == len(stored)
        assert await response.read() == stored

    async def given_back() -> bool:
        return bool(client.app[DOWNLOADS].held(CALLER) == 0)

    await wait_until_async(given_back, timeout=10, message="the download's slot given back")


async def test_a_caller_that_stops_reading_is_cut_off_and_holds_one_download_meanwhile(
    client: Client, stored: bytes
) -> None:
    downloads = client.app[DOWNLOADS]

    async def holding(count: int) -> bool:
        return bool(downloads.held(CALLER) == count)

    async with stalled_download(client) as stalled:
        await wait_until_async(lambda: holding(1), timeout=10, message="the download started")
        # Its one download (IMGPIPE_GATEWAY_DOWNLOADS=1) is in progress: another is refused.
        async with client.get(PATH) as response:
            assert response.status == 429
            error = (await response.json())["error"]
            assert error["details"][0]["column"] == "downloads"
            assert "IMGPIPE_GATEWAY_DOWNLOADS=1" in error["message"]
            assert int(response.headers["Retry-After"]) >= 1
        # Taking nothing for 0.5 s, it is cut off: its slot is free, its connection gone
        # before the whole CSV was sent.
        await wait_until_async(lambda: holding(0), timeout=30, message="the stalled one cut off")
        received = 0
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(30):
                while piece := await stalled.read(1 << 20):
                    received += len(piece)
        assert 0 < received < len(stored)
    async with client.get(PATH) as response:
        assert response.status == 200
        assert await response.read() == stored


async def test_a_presigned_download_that_stalls_is_cut_off_too() -> None:
    """The rows rendered from the status service's pages go through the same idle timeout."""
    signed = "http://s3.test/b/o.jpg?X-Amz-Signature=" + "f" * 4000
    big = [
        request_pb2.Product(
            serial_number=str(n),
            product_name="Shoe",
            input_image_urls=["https://shop.example/a.jpg"] * 2,
            output_image_urls=[signed] * 2,
        )
        for n in range(SIZE // 8000)
    ]
    nowhere = S3Options(endpoint=f"http://127.0.0.1:{free_tcp_port()}", access_key_id="k")
    async with status_server(big) as status_addr:
        settings = GatewaySettings(
            ingest_addr=f"127.0.0.1:{free_tcp_port()}",
            status_addr=status_addr,
            storage=StorageConfig("s3://bucket", presign_expiry=3600, s3=nowhere),
            rpc_timeout=5,
            download_idle_timeout=0.5,
        )
        app = create_app(settings)
        async with TestClient(GatewayServer(app, host="127.0.0.1")) as client:

            async def holding(count: int) -> bool:
                return app[DOWNLOADS].held(CALLER) == count

            async with stalled_download(client):
                await wait_until_async(lambda: holding(1), timeout=10, message="started")
                await wait_until_async(lambda: holding(0), timeout=30, message="cut off")
