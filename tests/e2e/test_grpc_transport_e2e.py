"""End to end: the stack's gRPC under mTLS, and live progress across recycled connections.

The whole stack (`python -m services.local`) with the SDK (imgpipe.client) through the gateway,
which dials ingest and status with services/common/grpc_transport.py."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imgpipe.client import AsyncClient, Client
from services.common.grpc_transport import GrpcTransport, TlsFiles
from testing.certs import Authority
from testing.origin import ImageOrigin, held_origin
from testing.stack import Stack, StartStack

pytestmark = pytest.mark.e2e


def products_csv(urls: list[str]) -> bytes:
    rows = [f'{i},Product {i},"{url}"' for i, url in enumerate(urls, 1)]
    return "\n".join(["S. No.,Product Name,Input Image Urls", *rows, ""]).encode()


def tls_listeners(stack: Stack) -> list[str]:
    """The gRPC addresses the stack's services said they serve with TLS."""
    found = []
    for line in stack.log.read_text(errors="replace").splitlines():
        start = line.find("{")
        if start < 0 or '"serving"' not in line:
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line[start:])
            if entry.get("msg") == "serving" and entry.get("tls") is True:
                found.append(entry["listen"])
    return found


def upload_and_wait(base_url: str, csv: bytes) -> dict[str, Any]:
    with Client(base_url) as api:
        accepted, _ = api.upload(io.BytesIO(csv))
        return api.wait(accepted["request_id"])


async def health_check(transport: GrpcTransport, address: str) -> int:
    async with transport.channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # typeshed lists no methods
        answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(answer.status)


async def test_the_stack_runs_over_mtls(
    tmp_path: Path, image_origin: ImageOrigin, start_live_stack: StartStack
) -> None:
    (tmp_path / "pki").mkdir()
    ca = Authority.create(tmp_path / "pki")
    # One certificate for every process: the services serve with it, the gateway presents it.
    leaf = ca.issue("imgpipe")
    files = {"CERT": leaf.cert, "KEY": leaf.key, "CA": ca.cert}
    tls_env = {f"IMGPIPE_GRPC_TLS_{name}": str(path) for name, path in files.items()}
    stack = start_live_stack(image_origin.port, **tls_env)

    urls = [image_origin.url(f"/img/{i}.jpg") for i in range(3)]
    final = await asyncio.to_thread(upload_and_wait, stack.base_url, products_csv(urls))
    assert final["status"] == "Completed"
    assert final["progress"]["images_done"] == 3

    listeners = tls_listeners(stack)
    assert len(listeners) >= 4, stack.log_tail()  # ingest, status and the workers
    address = listeners[0]  # any service: each serves health
    mtls = GrpcTransport(TlsFiles(str(leaf.cert), str(leaf.key), str(ca.cert)))
    assert await health_check(mtls, address) == health_pb2.HealthCheckResponse.SERVING
    for refused in (GrpcTransport(), GrpcTransport(TlsFiles(ca=str(ca.cert)))):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await health_check(refused, address)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_live_progress_reconnects_when_its_connection_is_recycled(
    start_live_stack: StartStack,
) -> None:
    async with held_origin() as (port, release):
        # A grace far shorter than a watch stream (the default outlasts one): the status
        # service closes the stream's connection under it.
        stack = start_live_stack(
            port,
            IMGPIPE_GRPC_MAX_CONNECTION_AGE="1",
            IMGPIPE_GRPC_MAX_CONNECTION_AGE_GRACE="1",
        )
        url = f"http://127.0.0.1:{port}/img/held.jpg"
        async with AsyncClient(stack.base_url) as api:
            accepted, _ = await api.upload(io.BytesIO(products_csv([url])))
            request_id = accepted["request_id"]

            # The image is held, so the request stays open while the stream's connection
            # ages out: the gateway says in the stream that it lost its backend.
            names = [name async for name, _ in api.events(request_id)]
            assert names[0] == "progress" and names[-1] == "error", names

            release.set()
            final = await api.wait(request_id)  # reconnects, on a new connection
            assert final["status"] == "Completed"
    assert re.search(r"live progress interrupted", stack.log.read_text(errors="replace"))
