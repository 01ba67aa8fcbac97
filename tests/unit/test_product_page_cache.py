"""The gateway's kept status pages: reused only for the same version, bounded, expiring."""

from __future__ import annotations

import base64
import json

import pytest

from gateway import json_views
from gateway.product_page_cache import LARGE_FRACTION, ProductPageCache, ProductPageKey, Version
from services.common.errors import InvalidArgument
from services.common.page_token import decode_page_token, encode_page_token
from services.common.pb.imgpipe.v1 import request_pb2
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb

pytestmark = pytest.mark.unit

KEY = ProductPageKey("0f8fad5b-d9cb-469f-a165-70867728950e", 100, 0)
V1 = Version(request_pb2.REQUEST_STATUS_PROCESSING, 3, 1, (1_700_000_000, 5))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_page_is_reused_only_while_the_request_version_is_the_same() -> None:
    pages = ProductPageCache()
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
    pages = ProductPageCache()
    pages.put(KEY, V1, b"page")
    assert pages.get(KEY, changed) is None


def test_pages_expire_so_signed_urls_are_refreshed() -> None:
    clock = Clock()
    pages = ProductPageCache(max_age=60, clock=clock)
    pages.put(KEY, V1, b"page")
    clock.now += 60
    assert pages.get(KEY, V1) == b"page"
    clock.now += 0.001
    assert pages.get(KEY, V1) is None


def test_the_least_recently_read_page_goes_first() -> None:
    pages = ProductPageCache(max_entries=2)
    keys = [ProductPageKey(KEY.request_id, 100, row) for row in (0, 10, 20)]
    pages.put(keys[0], V1, b"a")
    pages.put(keys[1], V1, b"b")
    assert pages.get(keys[0], V1) == b"a"  # now the most recent
    pages.put(keys[2], V1, b"c")
    assert (pages.known(keys[0]), pages.known(keys[1]), pages.known(keys[2])) == (True, False, True)
    assert len(pages) == 2


def test_the_bytes_kept_never_pass_the_cap() -> None:
    pages = ProductPageCache(max_bytes=8000)
    body = b"x" * (8000 // LARGE_FRACTION)  # the largest body that is kept
    for row in range(100):
        pages.put(ProductPageKey(KEY.request_id, 100, row), V1, body)
        assert pages.size == len(pages) * len(body) <= 8000
    assert len(pages) == LARGE_FRACTION
    assert pages.known(ProductPageKey(KEY.request_id, 100, 99))  # the newest stay


def test_a_page_replaced_or_dropped_gives_its_bytes_back() -> None:
    pages = ProductPageCache(max_bytes=8000)
    pages.put(KEY, V1, b"x" * 900)
    pages.put(KEY, V1, b"y" * 100)
    assert (len(pages), pages.size) == (1, 100)
    assert pages.get(KEY, Version(V1.status, 4, 1, V1.updated_at)) is None
    assert (len(pages), pages.size) == (0, 0)


def test_a_large_page_is_not_kept_and_evicts_nothing() -> None:
    pages = ProductPageCache(max_bytes=8000)
    pages.put(KEY, V1, b"small")
    big = ProductPageKey(KEY.request_id, 1000, 0)
    pages.put(big, V1, b"x" * (8000 // LARGE_FRACTION + 1))
    assert not pages.known(big)
    assert pages.get(KEY, V1) == b"small"
    assert pages.size == len(b"small")


def test_expired_pages_are_removed_not_only_skipped() -> None:
    clock = Clock()
    pages = ProductPageCache(max_age=60, clock=clock)
    for row in range(10):
        pages.put(ProductPageKey(KEY.request_id, 100, row), V1, b"page")
    clock.now += 61
    pages.put(ProductPageKey("another", 100, 0), V1, b"new")  # any use purges what expired
    assert (len(pages), pages.size) == (1, 3)
    clock.now += 61
    pages.purge_expired()  # and the gateway purges on a timer when nobody polls
    assert (len(pages), pages.size) == (0, 0)


@pytest.mark.parametrize("row", [1, 2, 99, 2**31 - 1])
def test_a_page_token_decodes_to_its_row(row: int) -> None:
    assert decode_page_token(encode_page_token(row)) == row


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "token",
    [
        _b64("v1:007"),  # leading zeros: the same row spelled another way
        _b64("v1:000"),
        _b64("v1:7"),  # padded
        _b64("v1:7").rstrip("=") + "==",
        encode_page_token(7) + " ",
        " " + encode_page_token(7),
        _b64("v1:0").rstrip("="),  # the first page has one spelling: no token
        _b64("v1:+7").rstrip("="),
        _b64("v1:2147483648").rstrip("="),
        _b64("v2:7").rstrip("="),
        base64.b64encode(b"v1:1021").decode(),  # standard alphabet, not urlsafe
        "%%%",
        "djE6Nw" * 10,
    ],
)
def test_any_other_spelling_of_a_page_token_is_refused(token: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        decode_page_token(token)
    assert [d.column for d in refused.value.details] == ["page_token"]


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
    head = json_views.request_json(request, None)

    document = json.loads(json_views.join_members(head, json_views.products_members(page)))

    assert document == head | {
        "products": [json_views.product_json(page.products[0])],
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
    rendered = json_views.product_json(product)
    assert rendered["input_bytes"] == [5000, None, None]
    assert rendered["output_bytes"] == [1200, None, None]
