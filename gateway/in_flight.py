"""The requests being handled right now, so a shutdown can wait for them (gateway/serving.py)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.http_errors import Handler


class InFlight:
    """Counts the requests being handled, so a shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.count += 1
        self._idle.clear()
        try:
            response = await handler(request)
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()
        if self.draining.is_set():
            response.force_close()  # no keep-alive: this connection ends with this answer
        return response

    async def wait_idle(self) -> None:
        await self._idle.wait()
