"""`python -m gateway`: serve the REST gateway until SIGTERM/SIGINT, then drain."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.serving import drain, start
from services.common import metrics, telemetry
from services.common.auth import log_auth_state
from services.common.config import ConfigError
from services.common.json_logs import configure_logging
from services.common.process import exit_now

# On SIGTERM the listener closes at once; in-flight requests get this long to finish.
GRACE_SECONDS = 20.0


async def serve(settings: GatewaySettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, _, port = settings.http_listen.rpartition(":")
    runner = await start(create_app(settings), host.strip("[]"), int(port))
    await stop.wait()
    await drain(runner, GRACE_SECONDS)


def main() -> int:
    try:
        settings = GatewaySettings.from_env(os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging("gateway", settings.log_level)
    log_auth_state(settings.api_keys, settings.http_listen)
    # On a port of its own (IMGPIPE_METRICS_LISTEN), never the public API's.
    # Traces when imgpipe[otel] is installed and the OTEL_* variables (the SDK's own) ask.
    with metrics.serving(settings.metrics_listen), telemetry.configure("gateway", os.environ):
        asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    exit_now(main())
