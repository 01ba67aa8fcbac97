"""GET /openapi.json and GET /docs: the REST contract, and a page that renders it.

`gateway/openapi.json` is written by hand and is the contract itself: it is served byte for
byte, never generated from the routes. `tests/integration/test_openapi.py` keeps the two in
step (every registered route is documented, every documented operation is registered), and
`tests/e2e/test_schemathesis.py` checks the live gateway's answers against it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from aiohttp import web

HERE = Path(__file__).resolve().parent
DOCUMENT = HERE / "openapi.json"
DOCS_PAGE = HERE / "static" / "docs.html"

# The page runs its own inline script and style and may only fetch from this origin: it
# renders /openapi.json and needs nothing else.
_DOCS_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


@functools.cache
def _read(path: Path) -> bytes:
    # Read on first use, then kept: both files are small and only change with a release.
    return path.read_bytes()


async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document, exactly as it is in the repository."""
    return web.Response(body=_read(DOCUMENT), content_type="application/json", charset="utf-8")


async def docs(request: web.Request) -> web.Response:
    """A self-contained HTML page that fetches /openapi.json and renders it."""
    return web.Response(
        body=_read(DOCS_PAGE),
        content_type="text/html",
        charset="utf-8",
        headers=_DOCS_HEADERS,
    )
