"""The REST gateway application: `create_app(settings)` wires routes, middleware and resources.

HTTP in, gRPC out, JSON back (docs/architecture.md, "Contracts"). The REST handlers live in
`gateway.handlers` (JSON rendering in `gateway.json_views`, links in `gateway.urls`), the web
page's HTML routes in `gateway.html_handlers` (rendering in `gateway.html_pages`), the upload
streaming in `gateway.upload`, the error mapping in `gateway.http_errors` and the shutdown in
`gateway.serving`. Everything the application holds is under a key of `gateway.keys`, set
here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway import (
    expect_continue,
    handlers,
    html_handlers,
    observability,
    openapi,
    rate_headers,
    sign_in,
)
from gateway.auth_middleware import auth_middleware
from gateway.config import GatewaySettings
from gateway.grpc_backends import open_channels
from gateway.holds import Holds
from gateway.http_errors import error_middleware
from gateway.in_flight import InFlight
from gateway.keys import (
    ANONYMOUS_UPLOADS,
    API_KEYS,
    CHANNELS,
    DOWNLOADS,
    IN_FLIGHT,
    PAGE_REFUSAL,
    PRODUCT_PAGES,
    SESSIONS,
    SETTINGS,
    STORAGE,
)
from gateway.product_page_cache import ProductPageCache, purging_expired
from gateway.session_client import SessionClient
from services.common.storage import Storage


def create_app(settings: GatewaySettings) -> web.Application:
    """The gateway application; its gRPC channels and storage open when it starts."""
    in_flight = InFlight()
    # Outermost first: auth's 401 goes through the error middleware like any other error, and
    # every answer, errors included, is counted with its trace context set.
    app = web.Application(
        middlewares=[
            observability.observe_middleware,
            rate_headers.quota_middleware,
            in_flight.middleware,
            expect_continue.middleware,
            error_middleware,
            auth_middleware,
        ]
    )
    observability.setup(app)
    rate_headers.setup(app)
    app[SETTINGS] = settings
    app[API_KEYS] = settings.api_keys
    app[SESSIONS] = SessionClient(settings.rpc_timeout)
    app[PAGE_REFUSAL] = html_handlers.html_error_response
    app[IN_FLIGHT] = in_flight
    app[PRODUCT_PAGES] = ProductPageCache(max_bytes=settings.page_cache_bytes)
    app[ANONYMOUS_UPLOADS] = Holds(settings.anonymous_uploads, "uploads", "IMGPIPE_LIMIT_UPLOADS")
    app[DOWNLOADS] = Holds(settings.downloads, "downloads", "IMGPIPE_GATEWAY_DOWNLOADS")
    app.cleanup_ctx.append(_connected_while_running)
    app.cleanup_ctx.append(_product_pages_purged_while_running)
    _add_routes(app.router)
    return app


async def _connected_while_running(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[STORAGE] = Storage.from_config(settings.storage)
    async with open_channels(settings) as channels:
        app[CHANNELS] = channels
        app[SESSIONS].connect(channels.sessions)
        yield


async def _product_pages_purged_while_running(app: web.Application) -> AsyncIterator[None]:
    async with purging_expired(app[PRODUCT_PAGES]):
        yield


def _add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/upload", handlers.upload, expect_handler=expect_continue.defer)
    router.add_get("/status", handlers.status)
    router.add_get("/status/{request_id}", handlers.status)
    router.add_get("/requests", handlers.list_requests)
    router.add_delete("/requests/{request_id}", handlers.delete)
    router.add_post("/requests/{request_id}/cancel", handlers.cancel)
    router.add_get("/requests/{request_id}/output.csv", handlers.output_csv)
    router.add_get("/requests/{request_id}/events", handlers.events)
    router.add_post("/requests/{request_id}/retry", handlers.retry)
    router.add_get("/requests/{request_id}/webhooks", handlers.webhooks)
    router.add_post("/requests/{request_id}/webhooks/redeliver", handlers.redeliver_webhook)
    router.add_get("/webhook-secret", handlers.webhook_secret)
    router.add_post("/webhook-secret/rotate", handlers.rotate_webhook_secret)
    router.add_get("/queue", handlers.queue)
    router.add_get("/files/{key:.+}", handlers.files)
    router.add_get("/healthz", handlers.healthz)
    router.add_get("/readyz", handlers.readyz)
    router.add_get("/openapi.json", openapi.openapi)
    router.add_get("/docs", openapi.docs)
    # Browser sign-in: a session id (never the key) in an HttpOnly cookie (gateway/sign_in.py).
    router.add_post("/session", sign_in.sign_in)
    router.add_post("/session/logout", sign_in.sign_out)
    # The web page, and its HTML routes for browsers without JavaScript.
    router.add_get("/", html_handlers.index)
    router.add_get("/static/{name}", html_handlers.asset)
    router.add_post("/ui/upload", html_handlers.upload_form)
    router.add_get("/ui/requests", html_handlers.requests_page)
    router.add_get("/ui/requests/{request_id}", html_handlers.request_page)
    router.add_post("/ui/requests/{request_id}/cancel", html_handlers.cancel_form)
