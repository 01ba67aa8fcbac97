"""The gateway's kept status pages: reused only for the same version, bounded, expiring."""

from __future__ import annotations

import json

import pytest

from gateway import views
from gateway.page_cache import PageCache, PageKey, Version
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb

pytestmark = pytest.mark.unit

KEY = PageKey("0f8fad5b-d9cb-469f-a165-70867728950e", 100, "")
V1 = Version(request_pb2.REQUEST_STATUS_PROCESSING, 3, 1, (1_700_000_000, 5))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_page_is_reused_only_while_the_request_version_is_the_same() -> None:
    pages = PageCache()
    pages.put(KEY, V1, b"page")
    assert pages.get(KEY, V1) == b"page"

    one_more_done = Version(V1.status, 4, 1, V1.updated_at)
    assert pages.get(KEY, one_more_done) is None
    assert not pages.known(KEY)  # a stale page is dropped, not kept beside the new one


@pytest.mark.parametrize(
    "changed",
    [
        Version(request_pb2.REQUEST_STATUS_COMPLETED, 3, 1, V1.updated_at),
        Version(V1.status, 3, 0, V1.updated_at),  # a retry took a failed image back
        Version(V1.status, 3, 1, (1_700_000_000, 6)),
    ],
)
def test_any_change_of_the_head_invalidates(changed: Version) -> None:
    pages = PageCache()
    pages.put(KEY, V1, b"page")
    assert pages.get(KEY, changed) is None


def test_pages_expire_so_signed_urls_are_refreshed() -> None:
    clock = Clock()
    pages = PageCache(max_age=60, clock=clock)
    pages.put(KEY, V1, b"page")
    clock.now += 60
    assert pages.get(KEY, V1) == b"page"
    clock.now += 0.001
    assert pages.get(KEY, V1) is None


def test_the_least_recently_read_page_goes_first() -> None:
    pages = PageCache(max_entries=2)
    keys = [PageKey(KEY.request_id, 100, token) for token in ("a", "b", "c")]
    pages.put(keys[0], V1, b"a")
    pages.put(keys[1], V1, b"b")
    assert pages.get(keys[0], V1) == b"a"  # now the most recent
    pages.put(keys[2], V1, b"c")
    assert (pages.known(keys[0]), pages.known(keys[1]), pages.known(keys[2])) == (True, False, True)
    assert len(pages) == 2


def test_version_reads_the_request_head() -> None:
    request = request_pb2.Request(
        status=request_pb2.REQUEST_STATUS_PROCESSING,
        progress=request_pb2.Progress(images_done=3, images_failed=1),
    )
    request.updated_at.FromSeconds(1_700_000_000)
    request.updated_at.nanos = 5
    assert Version.of(request) == V1


def test_joined_members_are_the_whole_status_document() -> None:
    request = request_pb2.Request(
        request_id=KEY.request_id, status=request_pb2.REQUEST_STATUS_PROCESSING
    )
    page = status_pb.ListProductsResponse(
        products=[
            request_pb2.Product(
                serial_number="1",
                product_name='Shoe "<b>"',
                input_image_urls=["http://127.0.0.1/a.jpg"],
                output_image_urls=[""],
            )
        ],
        next_page_token="tok",
    )
    head = views.request_json(request, None)

    document = json.loads(views.join_members(head, views.products_members(page)))

    assert document == head | {
        "products": [views.product_json(page.products[0])],
        "next_page_token": "tok",
    }
    assert list(document)[-2:] == ["products", "next_page_token"]


def test_product_sizes_line_up_with_the_urls_and_are_null_until_done() -> None:
    product = request_pb2.Product(
        input_image_urls=["http://127.0.0.1/a.jpg", "http://127.0.0.1/b.jpg", "http://x/c"],
        output_image_urls=["http://127.0.0.1/files/a.jpg", "", ""],
        input_bytes=[5000, 0, 0],
        output_bytes=[1200, 0, 0],
    )
    rendered = views.product_json(product)
    assert rendered["input_bytes"] == [5000, None, None]
    assert rendered["output_bytes"] == [1200, None, None]
