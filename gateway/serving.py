"""Serving the gateway, and a shutdown that lets in-flight requests finish, uploads included.

aiohttp's own graceful shutdown (`web.run_app`) stops reading from every connection as soon as
it begins, so an upload whose body is still arriving would stall until the timeout and be cut
off. `drain` instead closes the listener, waits (up to the grace period) for the requests being
handled to finish while their bodies keep streaming in, and only then closes the connections.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from gateway.access_log import AccessLogger
from gateway.keys import IN_FLIGHT

log = logging.getLogger(__name__)

# After the grace period, what is still running is cancelled and given this long to unwind.
_CANCEL_TIMEOUT = 2.0


# How the gateway is served; the tests serve it the same way (testing/gateway.py).
RUNNER_OPTIONS: dict[str, Any] = {
    "shutdown_timeout": _CANCEL_TIMEOUT,
    # The access log never writes query string values (gateway/access_log.py).
    "access_log_class": AccessLogger,
    # A handler whose client went away is cancelled at once, so what it holds goes with the
    # client (a live-progress stream's `streams=` lease and gRPC call, a page being rendered),
    # not at its next write (KEEPALIVE, 15 s, for a quiet stream).
    "handler_cancellation": True,
}


async def start(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving `app` on host:port (port 0 picks a free one: see `runner.addresses`)."""
    runner = web.AppRunner(app, **RUNNER_OPTIONS)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("serving", extra={"addresses": [str(a) for a in runner.addresses]})
    return runner


async def drain(runner: web.AppRunner, grace: float) -> None:
    """Stop accepting connections, let in-flight requests finish within `grace`, then stop."""
    in_flight = runner.app[IN_FLIGHT]
    try:
        in_flight.draining.set()
        for site in list(runner.sites):
            await site.stop()
        log.info("draining", extra={"in_flight": in_flight.count, "grace": grace})
        try:
            async with asyncio.timeout(grace):
                await in_flight.wait_idle()
        except TimeoutError:
            log.warning("grace period over: cancelling", extra={"in_flight": in_flight.count})
    finally:
        await runner.cleanup()
    log.info("stopped")
