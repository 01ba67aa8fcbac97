"""The gateway under test, served as production serves it.

aiohttp's TestServer builds its runner with aiohttp's defaults (and ignores the options given
to its constructor), so a test through it would not see what gateway/serving.py sets: the
access log without query values, the cancellation of a handler whose client left, the
shutdown timeout. `GatewayServer` runs the app with those very options.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.serving import RUNNER_OPTIONS


class GatewayServer(TestServer):
    """A TestServer whose runner is gateway/serving.py's (on 127.0.0.1 unless told)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return web.AppRunner(self.app, **(kwargs | RUNNER_OPTIONS))
