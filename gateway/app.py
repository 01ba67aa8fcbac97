"""The REST gateway application: `create_app(settings)` wires routes, middleware and backends.

HTTP in, gRPC out, JSON back (docs/architecture.md, "Contracts"). The handlers live in
`gateway.handlers`, the JSON rendering in `gateway.views`, the upload streaming in
`gateway.upload`, the error mapping in `gateway.errors` and the shutdown in `gateway.serving`.
"""

from __future__ import annotations

from aiohttp import web

from gateway import auth, handlers, observability, openapi, rate_headers
from gateway import web as web_page
from gateway.backends import SETTINGS, open_backends
from gateway.config import GatewaySettings
from gateway.errors import error_middleware
from gateway.page_cache import PAGES, PageCache, purge_while_running
from gateway.serving import IN_FLIGHT, InFlight
from gateway.upload import ANONYMOUS_UPLOADS, AnonymousUploads


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
            error_middleware,
            auth.auth_middleware,
        ]
    )
    observability.setup(app)
    rate_headers.setup(app)
    app[SETTINGS] = settings
    app[auth.API_KEYS] = settings.api_keys
    app[auth.SESSIONS] = auth.Sessions(settings.rpc_timeout)
    app[auth.PAGE_REFUSAL] = web_page.error_response
    app[IN_FLIGHT] = in_flight
    app[PAGES] = PageCache(max_bytes=settings.page_cache_bytes)
    app[ANONYMOUS_UPLOADS] = AnonymousUploads(settings.anonymous_uploads)
    app.cleanup_ctx.append(open_backends)
    app.cleanup_ctx.append(purge_while_running)
    app.router.add_post("/upload", handlers.upload)
    app.router.add_get("/status", handlers.status)
    app.router.add_get("/status/{request_id}", handlers.status)
    app.router.add_get("/requests", handlers.list_requests)
    app.router.add_delete("/requests/{request_id}", handlers.delete)
    app.router.add_post("/requests/{request_id}/cancel", handlers.cancel)
    app.router.add_get("/requests/{request_id}/output.csv", handlers.output_csv)
    app.router.add_get("/requests/{request_id}/events", handlers.events)
    app.router.add_post("/requests/{request_id}/retry", handlers.retry)
    app.router.add_get("/requests/{request_id}/webhooks", handlers.webhooks)
    app.router.add_post("/requests/{request_id}/webhooks/redeliver", handlers.redeliver_webhook)
    app.router.add_get("/webhook-secret", handlers.webhook_secret)
    app.router.add_post("/webhook-secret/rotate", handlers.rotate_webhook_secret)
    app.router.add_get("/queue", handlers.queue)
    app.router.add_get("/files/{key:.+}", handlers.files)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/openapi.json", openapi.openapi)
    app.router.add_get("/docs", openapi.docs)
    # Browser sign-in: a session id (never the key) in an HttpOnly cookie (gateway/auth.py).
    app.router.add_post("/session", auth.sign_in)
    app.router.add_post("/session/logout", auth.sign_out)
    # The web page, and its HTML routes for browsers without JavaScript (gateway/web.py).
    app.router.add_get("/", web_page.index)
    app.router.add_get("/static/{name}", web_page.asset)
    app.router.add_post("/ui/upload", web_page.upload_form)
    app.router.add_get("/ui/requests", web_page.requests_page)
    app.router.add_get("/ui/requests/{request_id}", web_page.request_page)
    app.router.add_post("/ui/requests/{request_id}/cancel", web_page.cancel_form)
    return app
