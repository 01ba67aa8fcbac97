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
    OutputFormat.AVIF: task_pb2.OUTPUT_FORMAT_AVIF,
    OutputFormat.AUTO: task_pb2.OUTPUT_FORMAT_AUTO,
    OutputFormat.AUTO_AVIF: task_pb2.OUTPUT_FORMAT_AUTO_AVIF,
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
        target_ratio=pb.target_ratio,
        min_ssim=pb.min_ssim,
    )


def to_proto(options: ImageOptions) -> task_pb2.ImageOptions:
    return task_pb2.ImageOptions(
        format=_TO_PROTO[options.format],
        quality=options.quality,
        scale=options.scale,
        max_width=options.max_width,
        max_height=options.max_height,
        effort=_EFFORT_TO_PROTO[options.effort],
        target_ratio=options.target_ratio,
        min_ssim=options.min_ssim,
    )


def to_json(options: ImageOptions) -> dict[str, Any]:
    return {
        "format": options.format.value,
        "quality": options.quality,
        "scale": options.scale,
        "max_width": options.max_width,
        "max_height": options.max_height,
        "effort": options.effort.value,
        "target_ratio": options.target_ratio,
        "min_ssim": options.min_ssim,
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
        # Requests stored before the goals existed had none.
        target_ratio=float(data.get("target_ratio", 0.0)),
        min_ssim=float(data.get("min_ssim", 0.0)),
    )


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
