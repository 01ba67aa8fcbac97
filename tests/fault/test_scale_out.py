"""Scale-out on one machine (issue 6, part 6): two complete worker groups share one Postgres,
one Redis and one SeaweedFS, both do the work, and killing one group entirely loses nothing.

A group is an ingest and two workers in one process group, so a single os.killpg kills all
three at once. Where the test may create network namespaces (root, or CAP_SYS_ADMIN), each
group also lives in one of its own with nothing but a loopback: its processes cannot reach the
other group's ports at all, and reach SeaweedFS and the image origin through relays this test
runs on 127.0.0.1 (Postgres and Redis too when they are containers on 127.0.0.1 ports; the
embedded ones listen on unix sockets, which need none). Elsewhere the groups share the host's
network and are separated by process group only.

How throughput adds up is measured in bench/ (B7), never asserted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import os
import secrets
import shutil
import signal
import socket
import struct
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.storage import Storage, StorageConfig
from services.common.streams import WORKER_GROUP
from testing.origin import ImageOrigin, image_urls, serve_images
from testing.polling import wait_until_async
from testing.ports import free_tcp_port
from testing.seaweed import BUCKET, SeaweedS3
from testing.services import Service, submit
from tests.fault.harness import Backends, Services, assert_clean, final_images

pytestmark = pytest.mark.timeout(180)

IMAGES = 300  # per request; one request through each group's ingest
WORKERS_PER_GROUP = 2
# Each group must have finished this many images before the kill: both share the work.
DONE_BEFORE_KILL = 10
SAMPLE = 20  # Done images per request read back from SeaweedFS


@pytest.fixture
async def origin() -> AsyncIterator[ImageOrigin]:
    # Small images and more latency than the other fault tests: four workers of 8 tasks each
    # would otherwise finish 600 images before the kill lands.
    async with serve_images((160, 120), delay=0.1) as images:
        yield images


@pytest.fixture
async def networks() -> AsyncIterator[Callable[[], Awaitable[GroupNetwork]]]:
    """Makes a GroupNetwork per group; closes them all after the test."""
    made: list[GroupNetwork] = []

    async def make() -> GroupNetwork:
        network = await GroupNetwork.create()
        made.append(network)
        return network

    try:
        yield make
    finally:
        for network in made:
            await network.close()


async def test_two_groups_share_the_work_and_one_dies_whole(
    backends: Backends,
    services: Services,
    origin: ImageOrigin,
    seaweed: SeaweedS3,
    networks: Callable[[], Awaitable[GroupNetwork]],
) -> None:
    storage_url = f"s3://{BUCKET}/scale-out-{secrets.token_hex(4)}"
    storage_env = seaweed.env(storage_url)
    endpoint_port = int(seaweed.endpoint.rpartition(":")[2])
    groups = []
    for name in ("A", "B"):
        network = await networks()
        # What a group dials on 127.0.0.1: storage, the origin, and Postgres and Redis when they
        # listen on ports (containers) rather than on unix sockets (embedded).
        await network.reach_out(endpoint_port, origin.port, *backends.tcp_ports())
        groups.append(await start_group(services, network, name, storage_env))
    a, b = groups
    await services.wait_serving(*a.members, *b.members)
    if a.network.isolated:
        # The groups share nothing but what they reach through the relays.
        with pytest.raises(ConnectionRefusedError):
            await b.network.connect_inside(a.network.inside_port(a.ingest))

    urls_a, urls_b = image_urls(origin, IMAGES, "via-a"), image_urls(origin, IMAGES, "via-b")
    request_a, request_b = await asyncio.gather(submit(a.ingest, urls_a), submit(b.ingest, urls_b))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        # Each request came in through its own group's ingest.
        for group in groups:
            uploads = await scrape(http, group.metrics[group.ingest.name], upload_count)
            assert uploads == 1, f"group {group.name}'s ingest handled {uploads} uploads"

        client = backends.redis_client()
        try:

            async def both_working_a_busy() -> dict[str, int] | None:
                done = {g.name: sum(await g.images_done(http)) for g in groups}
                summary: Any = await client.xpending(backends.names.tasks, WORKER_GROUP)
                held = sum(
                    int(consumer["pending"])
                    for consumer in summary["consumers"]
                    if consumer["name"].decode() in {w.name for w in a.workers}
                )
                # The worst moment: A holds tasks in flight that nobody acknowledged yet.
                return done if min(done.values()) >= DONE_BEFORE_KILL and held else None

            done_before = await wait_until_async(
                both_working_a_busy,
                timeout=60,
                interval=0.1,
                message=f"workers of both groups to complete {DONE_BEFORE_KILL} images",
                ignore=(aiohttp.ClientError, TimeoutError),
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{services.report()}") from None
        finally:
            await client.aclose()

        os.killpg(a.pgid, signal.SIGKILL)
        final_at_kill = [await final_images(backends, r) for r in (request_a, request_b)]
        for member in a.members:
            code = await member.wait_exit(10)
            assert code == -signal.SIGKILL, f"{member.name} exited with {code}, not by SIGKILL"
        with pytest.raises(ProcessLookupError):
            os.killpg(a.pgid, 0)  # every member reaped, and none was left behind
        assert sum(final_at_kill) < 2 * IMAGES, "both requests were final before the kill"

        # Group B alone finishes both requests, the one that came in through A included.
        for request_id in (request_a, request_b):
            await assert_clean(backends, services, request_id, images=IMAGES)
        assert all(member.process.poll() is None for member in b.members), services.report()
        # Shown with `pytest -rP`: what each group did.
        print(
            f"network: {'a namespace per group' if a.network.isolated else 'the host'};"
            f" done by the kill: {done_before}; final at the kill: {final_at_kill} of"
            f" {IMAGES} + {IMAGES}; done by B in all: {sum(await b.images_done(http))}"
        )

    await assert_stored(backends, seaweed, storage_url, (request_a, request_b))


# --- worker groups ----------------------------------------------------------------------------


@dataclass
class Group:
    """An ingest and its workers, in one process group led by the ingest."""

    name: str
    ingest: Service
    workers: list[Service]
    metrics: dict[str, int]  # service name -> the port its /metrics answers on for the test
    network: GroupNetwork

    @property
    def pgid(self) -> int:
        return self.ingest.pid

    @property
    def members(self) -> list[Service]:
        return [self.ingest, *self.workers]

    async def images_done(self, http: aiohttp.ClientSession) -> list[int]:
        """imgpipe_images_total{outcome="done"} of each worker."""
        return list(
            await asyncio.gather(
                *(scrape(http, self.metrics[worker.name], done_count) for worker in self.workers)
            )
        )


async def start_group(
    services: Services, network: GroupNetwork, name: str, storage_env: dict[str, str]
) -> Group:
    members: list[Service] = []
    metrics: dict[str, int] = {}
    pgid = 0  # the first process leads a new group; the others join it
    roles = [("services.ingest", f"{name}-ingest")]
    roles += [("services.worker", f"{name}-worker-{i}") for i in range(1, WORKERS_PER_GROUP + 1)]
    for module, member in roles:
        metrics_port = free_tcp_port()
        extra = {"IMGPIPE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}", **storage_env}
        if module == "services.worker":
            extra["IMGPIPE_CONSUMER_NAME"] = member
        service = services.start(
            module, member, extra, process_group=pgid, launcher=network.launcher
        )
        pgid = pgid or service.pid
        # The test reaches the service's gRPC and /metrics ports at the same numbers.
        await network.reach_in(network.inside_port(service), metrics_port)
        metrics[member] = metrics_port
        members.append(service)
    assert all(os.getpgid(m.pid) == pgid for m in members), "a member left the process group"
    return Group(name, members[0], members[1:], metrics, network)


def done_count(families: dict[str, Any]) -> int:
    return int(
        sum(
            sample.value
            for sample in families["imgpipe_images"].samples
            if sample.name == "imgpipe_images_total" and sample.labels["outcome"] == "done"
        )
    )


def upload_count(families: dict[str, Any]) -> int:
    return int(
        sum(
            sample.value
            for sample in families["grpc_server_handled"].samples
            if sample.name == "grpc_server_handled_total"
            and sample.labels["grpc_method"] == "UploadCsv"
            and sample.labels["grpc_code"] == "OK"
        )
    )


async def scrape(
    http: aiohttp.ClientSession, port: int, read: Callable[[dict[str, Any]], int]
) -> int:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        response.raise_for_status()
        text = await response.text()
    return read({family.name: family for family in text_string_to_metric_families(text)})


async def assert_stored(
    backends: Backends, seaweed: SeaweedS3, storage_url: str, request_ids: tuple[str, ...]
) -> None:
    """A sample of each request's outputs, and its output CSV, are in SeaweedFS, whole."""
    storage = Storage.from_config(StorageConfig(storage_url, s3=seaweed.s3_options))
    connection = await asyncpg.connect(backends.database_url)
    try:
        for request_id in request_ids:
            rows = await connection.fetch(
                """SELECT output_key, bytes_out FROM images
                    WHERE request_id = $1 AND status = 'Done' ORDER BY random() LIMIT $2""",
                uuid.UUID(request_id),
                SAMPLE,
            )
            assert len(rows) == SAMPLE
            for row in rows:
                data = await storage.get(row["output_key"])
                assert data[:2] == b"\xff\xd8", f"{row['output_key']} is not a JPEG"
                assert len(data) == row["bytes_out"], f"{row['output_key']} is not whole"
            csv_key = await connection.fetchval(
                "SELECT output_csv_key FROM requests WHERE id = $1", uuid.UUID(request_id)
            )
            assert (await storage.get(csv_key)).startswith(b"S. No.,"), csv_key
    finally:
        await connection.close()


# --- a network namespace per group ----------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = "16sh22x"  # struct ifreq: the name, then the flags of the ifr_flags union member


def _unshare_network() -> int:
    """Move the calling thread, and only it, into a new network namespace and bring its
    loopback up; returns the thread's id."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(_IFREQ, b"lo", 0)
        flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))
    return threading.get_native_id()


def _listening_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class GroupNetwork:
    """Where one group's processes live: a network namespace of their own, held by one thread
    of this test that sockets are made in, or the host's network when the test may not create
    a namespace. TCP relays on 127.0.0.1 join the two sides port by port, at the same number
    on both."""

    def __init__(self, thread: ThreadPoolExecutor | None, launcher: tuple[str, ...]) -> None:
        self._thread = thread  # None: the host's network
        self.launcher = launcher  # runs a service inside the namespace (nsenter execs it)
        self._servers: list[asyncio.Server] = []
        # Each relay's task, and the ends of its connection.
        self._relays: dict[asyncio.Task[Any], list[asyncio.StreamWriter]] = {}

    @classmethod
    async def create(cls) -> GroupNetwork:
        nsenter = shutil.which("nsenter")
        if nsenter is None:
            return cls(None, ())
        thread = ThreadPoolExecutor(1, thread_name_prefix="netns")  # its one thread stays
        try:
            tid = await asyncio.get_running_loop().run_in_executor(thread, _unshare_network)
        except OSError:  # EPERM: not allowed here, so the groups share the host's network
            thread.shutdown()
            return cls(None, ())
        return cls(thread, (nsenter, f"--net=/proc/{os.getpid()}/task/{tid}/ns/net", "--"))

    @property
    def isolated(self) -> bool:
        return self._thread is not None

    @staticmethod
    def inside_port(service: Service) -> int:
        return int(service.listen.rpartition(":")[2])

    async def reach_out(self, *ports: int) -> None:
        """Inside, 127.0.0.1:port leads to the host's 127.0.0.1:port."""
        if self._thread is None:
            return
        loop = asyncio.get_running_loop()
        for port in ports:
            sock = await loop.run_in_executor(self._thread, _listening_socket, port)
            await self._serve(sock, functools.partial(asyncio.open_connection, "127.0.0.1", port))

    async def reach_in(self, *ports: int) -> None:
        """On the host, 127.0.0.1:port leads to 127.0.0.1:port inside."""
        if self._thread is None:
            return
        for port in ports:
            sock = _listening_socket(port)
            await self._serve(sock, functools.partial(self.connect_inside, port))

    async def connect_inside(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to 127.0.0.1:port as seen inside the namespace."""
        assert self._thread is not None
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(self._thread, socket.socket)  # made inside
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def _serve(
        self,
        sock: socket.socket,
        connect: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
    ) -> None:
        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            ends = self._relays[task] = [writer]
            try:
                try:
                    far_reader, far_writer = await connect()
                except OSError:
                    return  # nothing listens there (yet, or any more): the caller sees a close
                ends.append(far_writer)
                await asyncio.gather(_pipe(reader, far_writer), _pipe(far_reader, writer))
            finally:
                for end in ends:
                    end.close()
                del self._relays[task]

        self._servers.append(await asyncio.start_server(relay, sock=sock))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        # Cutting the connections ends their relays; cancelling them instead would make
        # asyncio's stream server log each CancelledError.
        for ends in self._relays.values():
            for end in ends:
                end.transport.abort()
        await asyncio.gather(*self._relays)
        for server in self._servers:
            await server.wait_closed()
        if self._thread is not None:
            self._thread.shutdown()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until end of file, then pass the end of file on."""
    # A reset, or a socket no longer connected, is how a killed group's connections end.
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
