"""The server-rendered status page: hostile CSV values render as text, and the page reloads
itself only while the request is unfinished."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.html_pages import (
    error_page,
    format_bytes,
    format_duration,
    product_quality,
    product_saving,
    status_page,
)
from services.common.errors import Detail, InvalidCsv

pytestmark = pytest.mark.unit

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def request(status: str, **progress: Any) -> dict[str, Any]:
    counts: dict[str, Any] = {
        **{"images_total": 2, "images_done": 1, "images_failed": 1, "percent": 100.0},
        **{"bytes_in": 5000, "bytes_out": 1000, "images_per_second": 2.0, "eta_seconds": None},
    }
    return {
        "request_id": "r-1",
        "status": status,
        "progress": counts | progress,
        "output_csv_url": "http://gw.example/requests/r-1/output.csv",
    }


def product(name: str = "Shoe", serial: str = "1") -> dict[str, Any]:
    return {
        "serial_number": serial,
        "product_name": name,
        "input_image_urls": ["https://shop.example/a.jpg", "javascript:alert(1)"],
        "output_image_urls": ["https://cdn.example/out/a.jpg", None],
        "errors": [{"url": "javascript:alert(1)", "code": "HTTP_STATUS", "message": HOSTILE}],
    }


def test_values_from_the_csv_are_text_and_only_http_urls_are_links() -> None:
    page = status_page(request("Completed"), [product(HOSTILE, serial=HOSTILE)], None)
    assert "<script>" not in page and "<img src=x" not in page
    escaped = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"
    assert f'<td class="num">{escaped}</td><td class="name">{escaped}</td>' in page
    assert not re.search(r"""(href|src)="javascript""", page, flags=re.IGNORECASE)
    # The failed image is its code, not an <img> of its source.
    assert 'src="https://shop.example/a.jpg"' in page
    assert 'src="https://cdn.example/out/a.jpg"' in page
    assert "HTTP_<wbr>STATUS" in page


def test_an_unfinished_request_reloads_and_shows_no_products_yet() -> None:
    pending = status_page(request("Processing", percent=50.0, eta_seconds=75.0), [], None)
    assert '<meta http-equiv="refresh" content="2">' in pending
    assert "About 1 min 15 s left" in pending
    assert 'id="products"' not in pending and "Download output CSV" not in pending
    final = status_page(request("Completed"), [product()], "tok+/=")
    assert "http-equiv" not in final
    assert 'href="http://gw.example/requests/r-1/output.csv" download' in final
    assert 'href="/ui/requests/r-1?page_token=tok%2B%2F%3D"' in final
    assert 'id="stat-saved" data-value="4000">4.0 kB' in final


def test_a_refused_csv_lists_each_problem_by_row_and_column() -> None:
    page = error_page(
        InvalidCsv("2 problems", [Detail("empty product name", "Product Name", 3), Detail(HOSTILE)])
    )
    assert '<tr><td class="num">3</td><td>Product Name</td><td>empty product name</td></tr>' in page
    assert "<script>" not in page


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (472_300, "472.3 kB"), (5 * 10**9, "5.0 GB")],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0 s"), (59.6, "1 min 0 s"), (200, "3 min 20 s"), (7500, "2 h 5 min")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_product_saving_counts_done_images_only() -> None:
    product = {"input_bytes": [2_000_000, None], "output_bytes": [500_000, None]}
    assert product_saving(product) == ("saved 1.5 MB (75%)", "2.0 MB → 500.0 kB")
    assert product_saving({"input_bytes": [None], "output_bytes": [None]}) is None


def test_the_page_shows_the_lowest_ssim_the_notes_and_the_mean() -> None:
    shown = product() | {
        "ssim": [0.9812, None],
        "quality": [42, None],
        "notes": ["TARGET_NOT_MET", None],
    }
    page = status_page(request("Completed", mean_ssim=0.9812), [shown], None)
    assert '<dd id="stat-ssim" data-value="">0.981</dd>' in page
    assert '<span class="ssim" title="image 1: quality 42, SSIM 0.9812">SSIM 0.981</span>' in page
    assert '<span class="note">1 target not met</span>' in page


def test_no_ssim_yet_shows_a_dash_and_no_product_line() -> None:
    page = status_page(request("Processing", mean_ssim=None), [product()], None)
    assert '<dd id="stat-ssim" data-value="">—</dd>' in page
    assert 'class="ssim"' not in page
    assert product_quality({"ssim": [None, None]}) is None
