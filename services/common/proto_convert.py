"""Conversions between protobuf messages, Python values and what Postgres keeps."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.common import tracing
from services.common.db import queries
from services.common.encoders import Effort
from services.common.errors import NotFound
from services.common.imaging import ImageOptions, OutputFormat
from services.common.pb.imgpipe.v1 import request_pb2, task_pb2

_TO_PROTO = {
    OutputFormat.JPEG: task_pb2.OUTPUT_FORMAT_JPEG,
    OutputFormat.WEBP: task_pb2.OUTPUT_FORMAT_WEBP,
    OutputFormat.PNG: task_pb2.OUTPUT_FORMAT_PNG,
}
_FROM_PROTO = {value: key for key, value in _TO_PROTO.items()}
_EFFORT_TO_PROTO = {
    Effort.FAST: task_pb2.EFFORT_FAST,
    Effort.BALANCED: task_pb2.EFFORT_BALANCED,
    Effort.MAX: task_pb2.EFFORT_MAX,
}
_EFFORT_FROM_PROTO = {value: key for key, value in _EFFORT_TO_PROTO.items()}


def from_proto(pb: task_pb2.ImageOptions) -> ImageOptions:
    """Zero values mean the defaults: JPEG, quality 50, no resize, balanced effort."""
    defaults = ImageOptions()
    return ImageOptions(
        format=_FROM_PROTO.get(pb.format, defaults.format),
        quality=pb.quality or defaults.quality,
        scale=pb.scale or defaults.scale,
        max_width=pb.max_width,
        max_height=pb.max_height,
        effort=_EFFORT_FROM_PROTO.get(pb.effort, defaults.effort),
    )


def to_proto(options: ImageOptions) -> task_pb2.ImageOptions:
    return task_pb2.ImageOptions(
        format=_TO_PROTO[options.format],
        quality=options.quality,
        scale=options.scale,
        max_width=options.max_width,
        max_height=options.max_height,
        effort=_EFFORT_TO_PROTO[options.effort],
    )


def to_json(options: ImageOptions) -> dict[str, Any]:
    return {
        "format": options.format.value,
        "quality": options.quality,
        "scale": options.scale,
        "max_width": options.max_width,
        "max_height": options.max_height,
        "effort": options.effort.value,
    }


def from_json(data: dict[str, Any]) -> ImageOptions:
    return ImageOptions(
        format=OutputFormat(data.get("format", "jpeg")),
        quality=int(data.get("quality", 50)),
        scale=float(data.get("scale", 1.0)),
        max_width=int(data.get("max_width", 0)),
        max_height=int(data.get("max_height", 0)),
        # Requests stored before effort existed were encoded with optimize + progressive;
        # balanced is what they would get now.
        effort=Effort(data.get("effort", Effort.BALANCED.value)),
    )


STATUS_TO_PROTO = {
    "Pending": request_pb2.REQUEST_STATUS_PENDING,
    "Processing": request_pb2.REQUEST_STATUS_PROCESSING,
    "Completed": request_pb2.REQUEST_STATUS_COMPLETED,
    "Failed": request_pb2.REQUEST_STATUS_FAILED,
}
FINAL_STATUSES = frozenset({"Completed", "Failed"})


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
        progress=request_pb2.Progress(
            images_total=counters.images_total,
            images_done=counters.images_done,
            images_failed=counters.images_failed,
            bytes_in=counters.bytes_in,
            bytes_out=counters.bytes_out,
        ),
        occurred_at=occurred,
    )


def finished_event(request: queries.RequestRow) -> request_pb2.RequestEvent:
    occurred = Timestamp()
    occurred.GetCurrentTime()
    return request_pb2.RequestEvent(
        event_id=request.finished_event_id,
        type=request_pb2.REQUEST_EVENT_TYPE_FINISHED,
        request_id=str(request.id),
        status=STATUS_TO_PROTO[request.status],
        progress=request_pb2.Progress(
            images_total=request.images_total,
            images_done=request.images_done,
            images_failed=request.images_failed,
            percent=100.0,
            bytes_in=request.bytes_in,
            bytes_out=request.bytes_out,
        ),
        occurred_at=occurred,
        output_csv_key=request.output_csv_key or "",
        traceparent=tracing.current_traceparent(),
    )
