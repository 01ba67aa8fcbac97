"""CSV uploads as clients send them: the CSV of product rows, and UploadCsv over gRPC with the
body cut into chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

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
    """UploadCsv with the body cut into small chunks, as a real stream would arrive."""

    async def messages() -> AsyncIterator[ingest_pb.UploadCsvRequest]:
        yield ingest_pb.UploadCsvRequest(
            header=ingest_pb.UploadHeader(
                options=options or task_pb2.ImageOptions(),
                webhook_url=webhook_url,
                idempotency_key=idempotency_key,
            )
        )
        for start in range(0, len(body), chunk_size):
            yield ingest_pb.UploadCsvRequest(chunk=body[start : start + chunk_size])
        if complete:
            yield ingest_pb.UploadCsvRequest(end=ingest_pb.UploadEnd(count=len(body)))

    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    response = await stub.UploadCsv(messages(), timeout=20, metadata=metadata)
    return response.accepted
