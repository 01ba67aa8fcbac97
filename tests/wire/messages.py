"""What tests/wire/*.bin hold: the messages each earlier version wrote, rebuilt with today's
classes, to compare with what today's code reads from those bytes.

Add a file (and a builder here) when a proto change adds a field to ImageTask or
RequestEvent; never rewrite an existing file: it stands for what a running version writes.
`python -m tests.wire.messages DIR` writes the current version's files into DIR.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.pb.imgpipe.v1 import request_pb2 as request_pb
from services.common.pb.imgpipe.v1 import task_pb2 as task_pb

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _at(text: str) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(text).replace(tzinfo=UTC))
    return stamp


def image_task_82875e2() -> task_pb.ImageTask:
    """Every field ImageTask had at commit 82875e2 (the version before issue 18)."""
    return task_pb.ImageTask(
        request_id="5f0c6a2e-3b1d-4c8e-9a57-2d7e1f4b8c90",
        image_id=4_294_967_301,
        input_url="https://images.example/products/7/front.png?size=large",
        options=task_pb.ImageOptions(
            format=task_pb.OUTPUT_FORMAT_AUTO_AVIF,
            quality=72,
            scale=0.5,
            max_width=1600,
            max_height=1200,
            effort=task_pb.EFFORT_MAX,
            target_ratio=0.25,
            min_ssim=0.0,
        ),
        enqueued_at=_at("2026-12-05T10:11:12.345678"),
        traceparent=TRACEPARENT,
    )


def request_event_82875e2() -> request_pb.RequestEvent:
    """Every field RequestEvent had at commit 82875e2."""
    return request_pb.RequestEvent(
        event_id="evt_01JEXAMPLE",
        type=request_pb.REQUEST_EVENT_TYPE_FINISHED,
        request_id="5f0c6a2e-3b1d-4c8e-9a57-2d7e1f4b8c90",
        status=request_pb.REQUEST_STATUS_COMPLETED,
        progress=request_pb.Progress(
            images_total=3,
            images_done=2,
            images_failed=1,
            percent=100.0,
            bytes_in=3_000_000,
            bytes_out=750_000,
            images_per_second=1.5,
            eta_seconds=0.0,
            mean_ssim=0.975,
        ),
        occurred_at=_at("2026-12-05T10:12:00"),
        output_csv_key="outputs/5f0c6a2e-3b1d-4c8e-9a57-2d7e1f4b8c90.csv",
        traceparent=TRACEPARENT,
    )


# File name -> the message it holds. Files are written once, by the version they are named after.
FIXTURES: dict[str, Callable[[], Message]] = {
    "image_task-82875e2.bin": image_task_82875e2,
    "request_event-82875e2.bin": request_event_82875e2,
}


def write(folder: Path) -> None:
    for name, build in FIXTURES.items():
        (folder / name).write_bytes(build().SerializeToString(deterministic=True))


if __name__ == "__main__":
    write(Path(sys.argv[1]))
