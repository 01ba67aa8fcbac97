"""Protobuf messages rendered as the JSON of docs/architecture.md "Contracts". Pure functions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2

from services.common.pb.imgpipe.v1 import ingest_service_pb2 as ingest_pb
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb

_T = TypeVar("_T")

STATUS_NAMES: dict[int, str] = {
    # The proto3 zero value: a fresh acceptance may leave the status unset.
    request_pb2.REQUEST_STATUS_UNSPECIFIED: "Pending",
    request_pb2.REQUEST_STATUS_PENDING: "Pending",
    request_pb2.REQUEST_STATUS_PROCESSING: "Processing",
    request_pb2.REQUEST_STATUS_COMPLETED: "Completed",
    request_pb2.REQUEST_STATUS_FAILED: "Failed",
    request_pb2.REQUEST_STATUS_CANCELLED: "Cancelled",
}
FINAL_STATUSES = frozenset(
    {
        request_pb2.REQUEST_STATUS_COMPLETED,
        request_pb2.REQUEST_STATUS_FAILED,
        request_pb2.REQUEST_STATUS_CANCELLED,
    }
)


LISTED_STATUSES = ("Pending", "Processing", "Completed", "Failed", "Cancelled")


def status_name(status: int) -> str:
    return STATUS_NAMES.get(status, "Pending")


def is_final(request: request_pb2.Request) -> bool:
    return request.status in FINAL_STATUSES


def timestamp(message: Any, field: str) -> str | None:
    """ISO 8601 in UTC (`2024-05-01T12:00:00.000Z`), or None when the field is unset."""
    if not message.HasField(field):
        return None
    value: timestamp_pb2.Timestamp = getattr(message, field)
    moment = value.ToDatetime(tzinfo=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def accepted_json(accepted: ingest_pb.Accepted, status_url: str) -> dict[str, Any]:
    return {
        "request_id": accepted.request_id,
        "status": status_name(accepted.status),
        "products": accepted.products,
        "images": accepted.images,
        "status_url": status_url,
    }


def products_members(page: status_pb.ListProductsResponse) -> bytes:
    """The `products` and `next_page_token` members of the status document, as JSON text
    without braces, for `join_members` (kept by gateway/product_page_cache.py)."""
    members = json.dumps(
        {
            "products": [product_json(product) for product in page.products],
            "next_page_token": page.next_page_token or None,
        }
    )
    return members[1:-1].encode()


def join_members(head: dict[str, Any], members: bytes) -> bytes:
    """`head` (request_json) as a JSON object with `members` appended: GET /status's body."""
    text = json.dumps(head).encode()
    return text[:-1] + b", " + members + b"}"


def request_json(request: request_pb2.Request, output_csv_url: str | None) -> dict[str, Any]:
    """The request without its products: the status page head, and each live-progress event."""
    progress = request.progress
    return {
        "request_id": request.request_id,
        "status": status_name(request.status),
        "created_at": timestamp(request, "created_at"),
        "updated_at": timestamp(request, "updated_at"),
        "completed_at": timestamp(request, "completed_at"),
        "progress": {
            "images_total": progress.images_total,
            "images_done": progress.images_done,
            "images_failed": progress.images_failed,
            "percent": round(progress.percent, 1),
            "bytes_in": progress.bytes_in,
            "bytes_out": progress.bytes_out,
            "images_per_second": progress.images_per_second,
            "eta_seconds": progress.eta_seconds if progress.HasField("eta_seconds") else None,
            "mean_ssim": _ssim(progress.mean_ssim) if progress.HasField("mean_ssim") else None,
        },
        "output_csv_url": output_csv_url,
    }


def request_item_json(
    request: request_pb2.Request, status_url: str, output_csv_url: str | None
) -> dict[str, Any]:
    """One request of GET /requests: its head as on GET /status, with its product and image
    counts and where its status and output CSV are."""
    item = request_json(request, output_csv_url)
    item["products"] = request.products_total
    item["images"] = request.progress.images_total
    item["status_url"] = status_url
    return item


def product_json(product: request_pb2.Product) -> dict[str, Any]:
    inputs = list(product.input_image_urls)
    # One slot per input image, in the same order; an image with no output yet (or failed)
    # is null. A short list from the backend is padded so the slots always line up.
    outputs: list[str | None] = [url or None for url in product.output_image_urls]
    outputs += [None] * (len(inputs) - len(outputs))
    return {
        "serial_number": product.serial_number,
        "product_name": product.product_name,
        "input_image_urls": inputs,
        "output_image_urls": outputs,
        "errors": [
            {"url": error.url, "code": error.code, "message": error.message}
            for error in product.errors
        ],
        # Per slot, like the URLs: bytes downloaded and stored, null until the image is done.
        "input_bytes": _sizes(product.input_bytes, outputs),
        "output_bytes": _sizes(product.output_bytes, outputs),
        # What each done image kept (docs/quality.md): its SSIM, the quality setting used and
        # an outcome note such as TARGET_NOT_MET ("" when none); null until it is done.
        "ssim": product_ssims(product),
        "quality": _slots(product.quality, outputs, 0),
        "notes": _slots(product.notes, outputs, ""),
    }


def product_ssims(product: request_pb2.Product) -> list[float | None]:
    """Per input slot, the output's SSIM (4 decimals; None while not done, when failed, or
    for an image done before SSIM was measured, which the status service reports as 0)."""
    outputs: list[str | None] = [url or None for url in product.output_image_urls]
    outputs += [None] * (len(product.input_image_urls) - len(outputs))
    return [_ssim(value) if value else None for value in _slots(product.ssim, outputs, 0.0)]


def _ssim(value: float) -> float:
    return round(value, 4)


def _slots(values: Sequence[_T], outputs: list[str | None], missing: _T) -> list[_T | None]:
    padded = list(values) + [missing] * (len(outputs) - len(values))
    return [value if url is not None else None for value, url in zip(padded, outputs, strict=False)]


def _sizes(sizes: Sequence[int], outputs: list[str | None]) -> list[int | None]:
    return _slots(sizes, outputs, 0)


def retry_json(answer: ingest_pb.RetryFailedImagesResponse, status_url: str) -> dict[str, Any]:
    return {
        "request_id": answer.request_id,
        "status": status_name(answer.status),
        "images_retried": answer.images_retried,
        "status_url": status_url,
    }


def queue_json(stats: status_pb.GetQueueStatsResponse) -> dict[str, Any]:
    return {
        "backlog_images": stats.backlog_images,
        "stream_length": stats.stream_length,
        "in_flight": stats.in_flight,
        "consumers": stats.consumers,
        "dead_letter_length": stats.dead_letter_length,
        "released_images": stats.released_images,
        "owners": [
            {
                "owner": o.owner if o.yours else None,
                "yours": o.yours,
                "requests": o.requests,
                "waiting_images": o.waiting_images,
                "released_images": o.released_images,
            }
            for o in stats.owners
        ],
        "dead_letters": [
            {
                "entry_id": d.entry_id,
                "request_id": d.request_id,
                "image_id": d.image_id,
                "input_url": d.input_url,
                "error_code": d.error_code,
                "error_message": d.error_message,
                "deliveries": d.deliveries,
                "dead_at": timestamp(d, "dead_at"),
            }
            for d in stats.dead_letters
        ],
    }


DELIVERY_STATES = {
    status_pb.WEBHOOK_DELIVERY_STATE_SCHEDULED: "scheduled",
    status_pb.WEBHOOK_DELIVERY_STATE_SUCCEEDED: "succeeded",
    status_pb.WEBHOOK_DELIVERY_STATE_FAILED: "failed",
    status_pb.WEBHOOK_DELIVERY_STATE_ABANDONED: "abandoned",
}


def delivery_json(delivery: status_pb.WebhookDelivery) -> dict[str, Any]:
    return {
        "event_id": delivery.event_id,
        "event_type": delivery.event_type,
        "url": delivery.url,
        "attempt": delivery.attempt,
        "state": DELIVERY_STATES.get(delivery.state, "scheduled"),
        "status_code": delivery.status_code or None,
        "error": delivery.error or None,
        "created_at": timestamp(delivery, "created_at"),
        "attempted_at": timestamp(delivery, "attempted_at"),
        "next_attempt_at": timestamp(delivery, "next_attempt_at"),
    }


def webhook_secret_json(secret: status_pb.WebhookSecret) -> dict[str, Any]:
    previous = None
    if secret.previous_secret:
        previous = {
            "secret": secret.previous_secret,
            "generation": secret.previous_generation,
            "expires_at": timestamp(secret, "previous_expires_at"),
        }
    return {
        "owner": secret.owner,
        "secret": secret.secret,
        "generation": secret.generation,
        "previous": previous,
        "rotated_at": timestamp(secret, "rotated_at"),
    }


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Events message (JSON has no raw newlines, so one data line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
