"""A TCP relay that can freeze: what a network partition or a stalled server looks like to a
client whose connections are already open.

`async with postgres_relay(dsn) as (relay, through):` listens on 127.0.0.1:relay.port and
forwards every connection to the server `dsn` names (over TCP, or its Unix socket when the DSN
gives a socket folder, as the embedded server's does); `through` is the same DSN by way of
the relay. `relay.freeze()` stops forwarding in both directions and leaves every socket open,
so the client's reads and connection attempts wait as they would for an unplugged cable;
`relay.thaw()` forwards again, what was held back included.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable

CHUNK = 64 * 1024

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Relay:
    def __init__(self, open_upstream: Callable[[], Awaitable[Streams]]) -> None:
        self.open_upstream = open_upstream
        self.port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        await self._flowing.wait()  # a new connection is not answered while frozen
        try:
            upstream_reader, upstream_writer = await self.open_upstream()
        except OSError:
            writer.close()
            return
        self._writers.add(upstream_writer)
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def _track(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close(self) -> None:
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def postgres_relay(dsn: str) -> AsyncIterator[tuple[Relay, str]]:
    parts = urllib.parse.urlsplit(dsn)
    query = dict(urllib.parse.parse_qsl(parts.query))
    port = int(query.pop("port", None) or parts.port or 5432)
    socket_folder = query.pop("host", "")

    async def open_upstream() -> Streams:
        if socket_folder.startswith("/"):
            return await asyncio.open_unix_connection(f"{socket_folder}/.s.PGSQL.{port}")
        return await asyncio.open_connection(parts.hostname or "127.0.0.1", port)

    async with relay_to(open_upstream) as relay:
        credentials = parts.netloc.rpartition("@")[0]
        netloc = (
            f"{credentials}@127.0.0.1:{relay.port}" if credentials else f"127.0.0.1:{relay.port}"
        )
        yield (
            relay,
            urllib.parse.urlunsplit(
                parts._replace(netloc=netloc, query=urllib.parse.urlencode(query))
            ),
        )


@contextlib.asynccontextmanager
async def relay_to(open_upstream: Callable[[], Awaitable[Streams]]) -> AsyncIterator[Relay]:
    relay = Relay(open_upstream)
    server = await asyncio.start_server(
        lambda reader, writer: relay._track(reader, writer), "127.0.0.1", 0
    )
    relay.port = server.sockets[0].getsockname()[1]
    try:
        yield relay
    finally:
        server.close()
        await relay._close()
        await server.wait_closed()
