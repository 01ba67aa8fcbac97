"""Paging a 10,000-product request: CSV order kept, and no page scans the whole request."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import pytest

from services.common.csv_format import CsvLimits
from services.common.db import queries
from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.ingest.servicer import IngestServicer, registrar
from testing.uploads import upload
from tests.integration.conftest import serving

pytestmark = pytest.mark.integration

PRODUCTS = 10_000


@pytest.fixture
async def big_request(pool: asyncpg.Pool, redis_client: Any, names: Any) -> str:
    servicer = IngestServicer(pool, redis_client, names, CsvLimits())
    # Serial numbers in descending order, so CSV order and serial order disagree.
    lines = ["S. No.,Product Name,Input Image Urls"] + [
        f"{PRODUCTS - i},Product {i},http://h.example/{i}/a.jpg,http://h.example/{i}/b.jpg"
        for i in range(PRODUCTS)
    ]
    lines = [lines[0]] + [
        f'{line.split(",", 2)[0]},{line.split(",", 2)[1]},"{line.split(",", 2)[2]}"'
        for line in lines[1:]
    ]
    async with serving(registrar(servicer)) as channel:
        accepted = await upload(
            ingest_grpc.IngestServiceStub(channel),
            ("\n".join(lines) + "\n").encode(),
            chunk_size=65536,
        )
    assert accepted.products == PRODUCTS
    return accepted.request_id


async def test_pages_keep_csv_order(
    big_request: str, status_stub: status_grpc.StatusServiceAsyncStub
) -> None:
    serials: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await status_stub.ListProducts(
            status_pb.ListProductsRequest(request_id=big_request, page_size=1000, page_token=token),
            timeout=10,
        )
        serials += [p.serial_number for p in page.products]
        assert all(len(p.input_image_urls) == 2 for p in page.products)
        pages += 1
        if not (token := page.next_page_token):
            break
    assert pages == 10
    assert serials == [str(PRODUCTS - i) for i in range(PRODUCTS)]


async def test_the_last_page_reads_only_its_own_rows(big_request: str, pool: asyncpg.Pool) -> None:
    """EXPLAIN ANALYZE of the page query: the products scan returns the page and no more,
    whether it is the first page or the last. (Ingest refreshes the planner's statistics after
    a large request; without them Postgres may sort the whole request for every page.)"""
    for after_row in (0, PRODUCTS - 100):
        plan: Any = await pool.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + queries._PRODUCT_PAGE,
            uuid.UUID(big_request),
            after_row,
            101,
        )
        nodes = list(_nodes(json.loads(plan)[0]["Plan"]))
        product_scans = [n for n in nodes if n.get("Relation Name") == "products"]
        assert product_scans, nodes
        assert all("Seq Scan" not in n["Node Type"] for n in product_scans)
        assert max(n["Actual Rows"] for n in product_scans) <= 101, json.dumps(nodes, indent=1)[
            :3000
        ]
        image_scans = [n for n in nodes if n.get("Relation Name") == "images"]
        assert all("Seq Scan" not in n["Node Type"] for n in image_scans)


def _nodes(plan: dict[str, Any]) -> Any:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)
