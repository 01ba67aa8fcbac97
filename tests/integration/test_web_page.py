"""The web page's routes without a backend: the page and its files with their security
headers, and HTML answers (never JSON, never a trace) when a form post or a status page fails.

The whole flow in a real browser against the real stack is tests/browser/test_web_page.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from services.common.auth import Limits, key_hash, new_key, parse_api_keys
from services.common.session_ids import new_session_id
from testing.gateway import GatewayServer
from tests.integration.test_openapi import settings_for

pytestmark = pytest.mark.integration

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    server = GatewayServer(create_app(settings_for(tmp_path)), host="127.0.0.1")
    async with TestClient(server) as each:
        yield each


def assert_secured(response: aiohttp.ClientResponse) -> None:
    policy = response.headers["Content-Security-Policy"]
    for directive in (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' http: https:",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ):
        assert directive in policy
    assert "unsafe-inline" not in policy
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


async def test_the_page_is_self_contained_and_its_form_works_without_javascript(
    client: Client,
) -> None:
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    assert_secured(response)
    page = await response.text()
    # Nothing from elsewhere, no inline script or style: the policy would refuse them anyway.
    assert not re.search(r"""(src|href|action)\s*=\s*["']?(https?:)?//""", page)
    assert not re.search(r"<script(?![^>]*\bsrc=)", page)
    assert " style=" not in page and "<style" not in page
    form = re.search(r"<form id=\"upload-form\"[^>]*>", page)
    assert form is not None
    assert 'method="post"' in form[0] and 'action="/ui/upload"' in form[0]
    assert 'enctype="multipart/form-data"' in form[0]
    # A browser sends fields in document order, and the server needs the options first.
    fields = re.findall(r'name="(\w+)"', page[form.end() : page.index("</form>", form.end())])
    assert fields[-1] == "file"
    assert set(fields) == {
        "quality",
        "format",
        "effort",
        "target_ratio",
        "min_ssim",
        "scale",
        "max_width",
        "max_height",
        "webhook_url",
        "file",
    }


@pytest.mark.parametrize(
    ("name", "media_type"),
    [("app.js", "text/javascript"), ("app.css", "text/css"), ("favicon.svg", "image/svg+xml")],
)
async def test_the_page_files_are_served_with_their_types(
    client: Client, name: str, media_type: str
) -> None:
    response = await client.get(f"/static/{name}")
    assert response.status == 200
    assert response.content_type == media_type
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert len(await response.read()) > 100


@pytest.mark.parametrize("name", ["docs.html", "index.html", "..%2Fweb.py", "nope.js"])
async def test_only_the_page_files_are_served(client: Client, name: str) -> None:
    response = await client.get(f"/static/{name}")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"


async def test_a_refused_form_post_is_a_page_listing_each_problem(client: Client) -> None:
    form = aiohttp.FormData()
    form.add_field("quality", "0")
    form.add_field("format", "<script>alert(1)</script>")
    form.add_field("file", b"S. No.,Product Name,Input Image Urls\n", filename="p.csv")
    response = await client.post("/ui/upload", data=form, allow_redirects=False)
    assert response.status == 400
    assert response.content_type == "text/html"
    assert_secured(response)
    page = await response.text()
    rows = re.findall(r"<tr><td class=\"num\">(\d*)</td><td>(\w+)</td><td>(.*?)</td></tr>", page)
    assert {column for _, column, _ in rows} == {"quality", "format"}
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


async def test_a_status_page_with_the_backend_down_is_a_503_page(client: Client) -> None:
    response = await client.get("/ui/requests/0b6f0000-0000-4000-8000-000000000000")
    assert response.status == 503
    assert response.content_type == "text/html"
    assert_secured(response)
    assert "imgpipe is unavailable" in await response.text()


async def test_a_session_that_cannot_be_checked_is_a_503_page(tmp_path: Path) -> None:
    key = new_key()
    keys, _ = parse_api_keys(f"acme:{key_hash(key)}", Limits())
    app = create_app(dataclasses.replace(settings_for(tmp_path), api_keys=keys))
    async with TestClient(GatewayServer(app, host="127.0.0.1")) as client:
        response = await client.get(
            "/ui/requests/0b6f0000-0000-4000-8000-000000000000",
            headers={"Cookie": f"imgpipe_session={new_session_id()}"},
        )
        assert response.status == 503
        assert response.content_type == "text/html"
