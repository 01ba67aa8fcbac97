"""The pure parts of the request lifecycle (docs/lifecycle.md): list page tokens, the retention
setting, the Cancelled status in every mapping."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import pytest

from gateway import html_pages, json_views
from services.common.config import ConfigError
from services.common.errors import InvalidArgument
from services.common.page_token import decode_request_token, encode_request_token
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.proto_convert import FINAL_STATUSES, STATUS_FROM_PROTO, STATUS_TO_PROTO
from services.worker.config import WorkerSettings

pytestmark = pytest.mark.unit


def test_a_request_token_decodes_to_its_position() -> None:
    created = datetime(2026, 12, 6, 2, 30, 1, 123456, tzinfo=UTC)
    request_id = uuid.uuid4()
    token = encode_request_token(created, request_id)
    assert decode_request_token(token) == (created, request_id)
    assert decode_request_token("") is None


@pytest.mark.parametrize(
    "token",
    [
        "bogus",
        base64.urlsafe_b64encode(b"r1:12:" + uuid.UUID(int=1).hex.encode()).decode(),  # padded
        base64.urlsafe_b64encode(b"r1:0012:" + uuid.UUID(int=1).hex.encode()).decode().rstrip("="),
        base64.urlsafe_b64encode(b"v1:12").decode().rstrip("="),  # a product page's token
        base64.urlsafe_b64encode(b"r1:12:not-a-uuid").decode().rstrip("="),
    ],
)
def test_a_request_token_has_one_spelling(token: str) -> None:
    with pytest.raises(InvalidArgument):
        decode_request_token(token)


BACKENDS = {"IMGPIPE_DATABASE_URL": "postgresql://db/x", "IMGPIPE_REDIS_URL": "redis://r/0"}


def test_retention_defaults_to_30_days_and_0_keeps_everything() -> None:
    assert WorkerSettings.from_env(BACKENDS).retention_days == 30
    off = WorkerSettings.from_env(BACKENDS | {"IMGPIPE_RETENTION_DAYS": "0"})
    assert off.retention_days == 0
    with pytest.raises(ConfigError, match="IMGPIPE_RETENTION_DAYS"):
        WorkerSettings.from_env(BACKENDS | {"IMGPIPE_RETENTION_DAYS": "-1"})


def test_cancelled_is_a_final_status_everywhere() -> None:
    assert "Cancelled" in FINAL_STATUSES
    assert STATUS_FROM_PROTO[STATUS_TO_PROTO["Cancelled"]] == "Cancelled"
    cancelled = request_pb2.Request(status=request_pb2.REQUEST_STATUS_CANCELLED)
    assert json_views.is_final(cancelled)
    assert json_views.status_name(cancelled.status) == "Cancelled"


def _item(status: str) -> dict[str, object]:
    return {
        "request_id": "r-<1>",
        "status": status,
        "created_at": "2026-12-06T02:00:00.000Z",
        "completed_at": None,
        "progress": {
            "images_total": 4,
            "images_done": 1,
            "images_failed": 0,
            "percent": 25.0,
            "bytes_in": 10,
            "bytes_out": 5,
            "images_per_second": 0.0,
            "eta_seconds": None,
            "mean_ssim": None,
        },
        "output_csv_url": None,
    }


def test_the_status_page_has_a_cancel_button_while_the_request_runs() -> None:
    running = html_pages.status_page(_item("Processing"), [], None)
    assert 'action="/ui/requests/r-%3C1%3E/cancel"' in running
    assert 'id="cancel"' in running
    cancelled = html_pages.status_page(_item("Cancelled"), [], None)
    assert 'id="cancel"' not in cancelled
    assert "status-cancelled" in cancelled


def test_your_requests_lists_each_with_its_link_and_escapes_it() -> None:
    page = html_pages.requests_page([_item("Cancelled")], "tok")
    assert 'href="/ui/requests/r-%3C1%3E"' in page
    assert "<code>r-&lt;1&gt;</code>" in page
    assert "1 of 4" in page
    assert 'href="/ui/requests?page_token=tok"' in page
    assert "No requests yet." in html_pages.requests_page([], None)
