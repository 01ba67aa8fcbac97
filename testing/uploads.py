"""CSV uploads as clients send them: the CSV of product rows, and UploadCsv over gRPC with the
body cut into chunks."""

from __future__ import annotations

from collections.abc import Sequence

from services.common.initial_metadata import is_ready
from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import task_pb2


def csv_of(rows: Sequence[tuple[str, str, Sequence[str]]]) -> bytes:
    lines = ["S. No.,Product Name,Input Image Urls"]
    lines += [f'{serial},{name},"{",".join(urls)}"' for serial, name, urls in rows]
    return ("\r\n".join(lines) + "\r\n").encode()


def csv_for(urls: Sequence[str], per_product: int = 4) -> bytes:
    """A CSV of `urls`, `per_product` of them to a product row."""
    rows = [
        (str(n + 1), f"Product {n + 1}", urls[start : start + per_product])
        for n, start in enumerate(range(0, len(urls), per_product))
    ]
    return csv_of(rows)


async def upload(
    stub: ingest_grpc.IngestServiceAsyncStub,
    body: bytes,
    *,
    idempotency_key: str = "",
    options: task_pb2.ImageOptions | None = None,
    webhook_url: str = "",
    chunk_size: int = 7,
    complete: bool = True,
    api_key: str = "",
) -> ingest_pb.Accepted:
    """UploadCsv with the body cut into small chunks, as a real stream would arrive.

    Written as the gateway writes it: the header, then the file once ingest says it is ready
    (services/common/initial_metadata.py), so a refusal is never lost to a write in flight.
    """
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    call = stub.UploadCsv(None, timeout=20, metadata=metadata)
    header = ingest_pb.UploadHeader(
        options=options or task_pb2.ImageOptions(),
        webhook_url=webhook_url,
        idempotency_key=idempotency_key,
    )
    await call.write(ingest_pb.UploadCsvRequest(header=header))
    if is_ready(await call.initial_metadata()):
        for start in range(0, len(body), chunk_size):
            await call.write(ingest_pb.UploadCsvRequest(chunk=body[start : start + chunk_size]))
        if complete:
            await call.write(ingest_pb.UploadCsvRequest(end=ingest_pb.UploadEnd(count=len(body))))
        await call.done_writing()
    response = await call
    return response.accepted
