"""run_service(): the one main shape every imgpipe service shares.

It serves the service's gRPC APIs with grpc.health.v1 and reflection, runs the service's
background loops, and drains on SIGTERM/SIGINT: health goes NOT_SERVING, loops are told to
stop and given the grace period to finish in-flight work, then the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.grpc_transport import GrpcTransport
from services.common.metrics import GrpcServerInterceptor

log = logging.getLogger(__name__)

Register = Callable[[grpc.aio.Server], None]
Loop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> bool:  # noqa: ASYNC109
    """Wait until one of `events` is set, at most `timeout` seconds; True if one was set."""
    if any(event.is_set() for event in events):
        return True
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return any(event.is_set() for event in events)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Pause a loop for up to `seconds`; True (early) when `stop` is set."""
    await wait_any(stop, timeout=seconds)
    return stop.is_set()


class Health:
    """The health servicer plus the names it reports on."""

    def __init__(self, service_names: Sequence[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self.names = ["", *service_names]

    async def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.names:
            await self.servicer.set(name, status)


async def run_service(
    *,
    listen: str,
    service_names: Sequence[str] = (),
    register: Register | None = None,
    loops: Sequence[Loop] = (),
    grace: float = 20.0,
    stop: asyncio.Event | None = None,
    health: Health | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    transport: GrpcTransport | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain within `grace` seconds.

    `loops` are background coroutines taking the stop event; they must return soon after it is
    set, having finished or released their in-flight work. A loop that crashes stops the service.
    `health` lets a loop (the dependency monitor) report NOT_SERVING while the service runs.
    `interceptors` see every call (API keys and rate limits: services/common/auth.py).
    `transport` sets TLS and the connection age (services/common/grpc_transport.py).
    """
    transport = transport or GrpcTransport()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    health_state = health or Health(service_names)
    server = _server(transport, interceptors, register, health_state, service_names)
    transport.listen(server, listen)
    servers = [server]
    if probes := transport.health_server(health_state.servicer):
        servers.append(probes)
    for each in servers:
        await each.start()
    await health_state.set(True)
    log.info(
        "serving",
        extra={
            "listen": listen,
            "services": list(service_names),
            "tls": transport.tls.enabled,
            "health_listen": transport.health_listen,
        },
    )

    tasks = [
        asyncio.create_task(body(stop), name=getattr(body, "__name__", "loop")) for body in loops
    ]
    stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait())
    crashed: BaseException | None = None
    try:
        pending: set[asyncio.Task[Any]] = {stopper, *tasks}
        while not stop.is_set():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopper}:
                if task.exception() is not None:
                    crashed = task.exception()
                    log.error("background loop crashed", exc_info=crashed)
                    stop.set()
    finally:
        log.info("draining", extra={"grace_seconds": grace})
        await health_state.set(False)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            for task in late:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        stopper.cancel()
        await asyncio.gather(*(each.stop(grace) for each in servers))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")
    if crashed is not None:
        raise crashed


def _server(
    transport: GrpcTransport,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    register: Register | None,
    health: Health,
    service_names: Sequence[str],
) -> grpc.aio.Server:
    """The server with our services, health and reflection registered, not yet listening."""
    # Metrics and trace context outermost: they see calls the other interceptors refuse.
    server = transport.server(interceptors=[GrpcServerInterceptor(), *interceptors])
    if register is not None:
        register(server)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        [
            *service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return server
