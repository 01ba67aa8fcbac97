"""Conversions between protobuf messages, Python values and what Postgres keeps."""

from __future__ import annotations

import uuid
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from services.common import tracing
from services.common.db import queries
from services.common.errors import NotFound
from services.common.pb.imgpipe.v1 import request_pb2

STATUS_TO_PROTO = {
    "Pending": request_pb2.REQUEST_STATUS_PENDING,
    "Processing": request_pb2.REQUEST_STATUS_PROCESSING,
    "Completed": request_pb2.REQUEST_STATUS_COMPLETED,
    "Failed": request_pb2.REQUEST_STATUS_FAILED,
    "Cancelled": request_pb2.REQUEST_STATUS_CANCELLED,
}
STATUS_FROM_PROTO = {value: name for name, value in STATUS_TO_PROTO.items()}
FINAL_STATUSES = frozenset({"Completed", "Failed", "Cancelled"})


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def parse_request_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        # Not an id we could have issued: the same answer as an unknown one.
        raise NotFound(f"no request {raw[:64]}") from None


def progress_event(counters: queries.Counters) -> request_pb2.RequestEvent:
    occurred = Timestamp()
    occurred.GetCurrentTime()
    return request_pb2.RequestEvent(
        type=request_pb2.REQUEST_EVENT_TYPE_PROGRESS,
        request_id=str(counters.request_id),
        status=STATUS_TO_PROTO[counters.status],
        progress=counters_message(counters),
        occurred_at=occurred,
    )


def counters_message(counters: queries.Counters, percent: float = 0.0) -> request_pb2.Progress:
    """The stored counters as a Progress message (the mean SSIM only once one is measured)."""
    return request_pb2.Progress(
        images_total=counters.images_total,
        images_done=counters.images_done,
        images_failed=counters.images_failed,
        percent=percent,
        bytes_in=counters.bytes_in,
        bytes_out=counters.bytes_out,
        mean_ssim=counters.mean_ssim,
    )


def finished_event(request: queries.RequestRow) -> request_pb2.RequestEvent:
    occurred = Timestamp()
    occurred.GetCurrentTime()
    return request_pb2.RequestEvent(
        event_id=request.finished_event_id,
        type=request_pb2.REQUEST_EVENT_TYPE_FINISHED,
        request_id=str(request.id),
        status=STATUS_TO_PROTO[request.status],
        progress=counters_message(queries.Counters.of(request), percent=100.0),
        occurred_at=occurred,
        output_csv_key=request.output_csv_key or "",
        traceparent=tracing.current_traceparent(),
    )
