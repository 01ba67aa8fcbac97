"""Listeners on loopback for tests: a tripwire that only counts connections (it must see
none), and a webhook receiver that verifies every request with `standardwebhooks`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Tripwire:
    """A listener that only counts the connections it accepts."""

    host: str
    port: int = 0
    accepted: int = 0
    server: asyncio.Server | None = field(default=None, repr=False)

    async def start(self) -> None:
        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            writer.close()

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.server = await asyncio.start_server(on_connect, self.host, 0, family=family)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[Tripwire]:
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    def url(self, path: str = "/hook") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    payload: dict[str, Any]  # as verified by standardwebhooks


@dataclass
class Receiver:
    """A webhook endpoint that verifies every request with the secret and records it.

    `answers` are (status, headers) given to the first requests, in order; then 200. `on_request`
    is called with each verified request before it is answered. Requests to a path in
    `hung_paths` get no answer until `release` is set (at the latest when the receiver stops):
    a hung receiver. A path in `secrets` is verified with its own secret (another owner's)."""

    secret: str
    port: int = 0
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    on_request: Callable[[Received], None] | None = None
    hung_paths: set[str] = field(default_factory=set)
    secrets: dict[str, str] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0  # requests held unanswered now
    most_held: int = 0  # at once, ever

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, request: web.Request) -> web.Response:
        if request.path in self.hung_paths:
            self.held += 1
            self.most_held = max(self.most_held, self.held)
            try:
                await self.release.wait()
            finally:
                self.held -= 1
        body = await request.read()
        try:
            secret = self.secrets.get(request.path, self.secret)
            payload = Webhook(secret).verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            self.rejected.append(str(exc))
            return web.Response(status=400, text="bad signature")
        received = Received(dict(request.headers), body, payload)
        self.received.append(received)
        if self.on_request is not None:
            self.on_request(received)
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        return web.Response(status=status, headers=headers)


@contextlib.asynccontextmanager
async def serve_receiver(secret: str, host: str = "127.0.0.1") -> AsyncIterator[Receiver]:
    receiver = Receiver(secret)
    app = web.Application()
    app.router.add_post("/{path:.*}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    receiver.port = runner.addresses[0][1]
    try:
        yield receiver
    finally:
        receiver.release.set()
        await runner.cleanup()
