"""The OpenAPI document and the gateway's routes agree, and the gateway serves both the document
and its page.

No backend is needed: the gateway is built with ingest and status on closed ports, as in
test_gateway_errors.py. The live answers are checked against the document in
tests/e2e/test_schemathesis.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import OpenAPIV31SpecValidator

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.openapi import DOCUMENT
from services.common.storage import StorageConfig
from testing.gateway import GatewayServer
from testing.ports import free_tcp_port

pytestmark = pytest.mark.integration

Client = TestClient[web.Request, web.Application]

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_PATH_PARAMETER = re.compile(r"\{([^}]+)\}")


def settings_for(store: Path) -> GatewaySettings:
    """Ingest and status on ports nothing listens on: these tests need no backend."""
    return GatewaySettings(
        ingest_addr=f"127.0.0.1:{free_tcp_port()}",
        status_addr=f"127.0.0.1:{free_tcp_port()}",
        storage=StorageConfig(store.as_uri()),
        rpc_timeout=2,
    )


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    server = GatewayServer(create_app(settings_for(tmp_path)), host="127.0.0.1")
    async with TestClient(server) as each:
        yield each


def registered_operations() -> set[tuple[str, str]]:
    """(method, path template) of every route the gateway registers; HEAD comes with GET."""
    app = create_app(settings_for(Path("/nonexistent")))
    return {
        (route.method.lower(), path_template(route.resource))
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


def path_template(resource: web.AbstractResource) -> str:
    """The route as an OpenAPI path: `/files/{key}` for `/files/{key:.+}`."""
    if isinstance(resource, web.StaticResource):
        # A static directory's canonical form is its prefix; its files are one parameter.
        return f"{resource.canonical}/{{filename}}"
    return resource.canonical


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def resolve(document: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """`item`, or what its local `$ref` points at."""
    while "$ref" in item:
        target: Any = document
        for part in item["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        item = target
    return item


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    errors = [str(error) for error in OpenAPIV31SpecValidator(document).iter_errors()]
    assert errors == []


def test_the_document_is_stored_pretty_printed(document: dict[str, Any]) -> None:
    # Written by hand, kept in one layout so that diffs of the contract stay readable.
    text = DOCUMENT.read_text(encoding="utf-8")
    assert text == json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def test_every_route_is_documented_and_every_operation_is_a_route(
    document: dict[str, Any],
) -> None:
    registered = registered_operations()
    documented = documented_operations(document)
    assert sorted(registered - documented) == [], "routes missing from gateway/openapi.json"
    assert sorted(documented - registered) == [], "documented operations that are not routes"


def test_path_parameters_match_the_path_templates(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for method in HTTP_METHODS:
            if method not in item:
                continue
            parameters = [resolve(document, p) for p in [*item.get("parameters", [])]]
            parameters += [resolve(document, p) for p in item[method].get("parameters", [])]
            in_path = {p["name"] for p in parameters if p["in"] == "path"}
            assert in_path == set(_PATH_PARAMETER.findall(path)), f"{method.upper()} {path}"


def test_every_error_answer_is_the_shared_error_schema(document: dict[str, Any]) -> None:
    error_ref = {"$ref": "#/components/schemas/Error"}
    # The web page's HTML routes answer a page, for a person, where the API answers JSON.
    page = {"text/html": {"schema": {"type": "string"}}}
    for path, item in document["paths"].items():
        for method in HTTP_METHODS:
            if method not in item:
                continue
            responses = item[method]["responses"]
            # A success, or for a browser's form post the redirect that follows it (303).
            success = any(status.startswith("2") or status == "303" for status in responses)
            assert success, f"{method} {path}"
            allowed = [{"application/json": {"schema": error_ref}}]
            if path.startswith("/ui/"):
                allowed.append(page)
            for status, raw in responses.items():
                response = resolve(document, raw)
                if int(status) >= 400 and "content" in response:
                    assert response["content"] in allowed, f"{method.upper()} {path} {status}"


def test_every_backend_route_documents_503(document: dict[str, Any]) -> None:
    # Everything but the gateway's own answers goes to ingest or status, which can be down.
    local = {"/healthz", "/files/{key}", "/openapi.json", "/docs", "/", "/static/{name}"}
    for method, path in documented_operations(document):
        if path not in local:
            assert "503" in document["paths"][path][method]["responses"], f"{method} {path}"


async def test_openapi_json_serves_the_file_exactly(client: Client) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.read() == DOCUMENT.read_bytes()


async def test_docs_is_a_page_that_renders_the_document(client: Client) -> None:
    response = await client.get("/docs")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert 'fetch("/openapi.json"' in page
    # Self-contained: no script, style or font from elsewhere, and the browser enforces it.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
