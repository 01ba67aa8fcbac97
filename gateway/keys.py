"""Every `web.AppKey` of the gateway: what the application holds while it runs.

They are set in one place, `gateway.app` (the channels and the object store when the
application starts), and read by the handlers and middleware. This module imports only the
types they hold, none of the modules that read them, so any gateway module can import it.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from gateway.config import GatewaySettings
from gateway.grpc_backends import Channels
from gateway.holds import Holds
from gateway.in_flight import InFlight
from gateway.product_page_cache import ProductPageCache
from gateway.session_client import SessionClient
from services.common.auth import KeyRing
from services.common.errors import ImgpipeError
from services.common.storage import Storage

# Renders a refusal of a /ui/ route as an HTML page: handed to the auth middleware, so that it
# imports no pages (gateway/html_handlers.py provides it).
PageRefusal = Callable[[web.Request, ImgpipeError], web.Response]

SETTINGS = web.AppKey("settings", GatewaySettings)
API_KEYS = web.AppKey("api_keys", KeyRing)
CHANNELS = web.AppKey("channels", Channels)
STORAGE = web.AppKey("storage", Storage)
SESSIONS = web.AppKey("sessions", SessionClient)
PAGE_REFUSAL: web.AppKey[PageRefusal] = web.AppKey("page_refusal")
PRODUCT_PAGES = web.AppKey("product_pages", ProductPageCache)
IN_FLIGHT = web.AppKey("in_flight", InFlight)
ANONYMOUS_UPLOADS = web.AppKey("anonymous_uploads", Holds)
DOWNLOADS = web.AppKey("downloads", Holds)
