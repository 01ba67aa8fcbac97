"""The pieces of a fault test: a Postgres and a Redis the test may stop and start again, the
services as processes it may kill, and the checks every fault test ends with.

Everything blocking (starting a server, waiting for a process) runs in a thread: the image
origin lives on the test's event loop, and a blocked loop would turn into fetch timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import redis.asyncio
from redis.exceptions import RedisError

from services.common.pb.imgpipe.v1 import request_pb2
from services.common.streams import EVENT_FIELD, WORKER_GROUP, StreamNames
from services.local.embedded import EmbeddedPostgres, EmbeddedRedis, start_postgres, start_redis
from testing import containers
from testing.origin import ImageOrigin
from testing.polling import wait_until, wait_until_async
from testing.ports import free_tcp_port
from testing.processes import process_exited
from testing.services import SERVING, Service, start_service
from tests.integration.flows import stream_messages

GRACE_SECONDS = 10.0
# Generous: two cores, up to seven processes, and a visibility timeout of a few seconds.
COMPLETION_TIMEOUT = 90.0
SETTLE_TIMEOUT = 30.0

# Short limits, so that the visibility timeout derived from them is a few seconds and a task
# of a killed worker is taken over quickly. Unknown names are ignored by the settings reader.
TUNING = {
    "IMGPIPE_GRACE_SECONDS": f"{GRACE_SECONDS:g}",
    "IMGPIPE_LOG_LEVEL": "INFO",
    "IMGPIPE_WORKER_CONCURRENCY": "8",
    "IMGPIPE_FETCH_CONNECT_TIMEOUT": "1",
    "IMGPIPE_FETCH_TOTAL_TIMEOUT": "2",
    "IMGPIPE_FETCH_STALL_TIMEOUT": "1",
    "IMGPIPE_MAX_ATTEMPTS": "2",
    "IMGPIPE_FETCH_MAX_RETRY_AFTER": "1",
    "IMGPIPE_PROCESS_BUDGET": "2",
    "IMGPIPE_RECONCILE_INTERVAL": "1",
    "IMGPIPE_CLAIM_INTERVAL": "1",
}


class Backends:
    """A Postgres and a Redis of one test's own, stopped and started with the same URLs.
    Redis keeps nothing across a restart.

    Embedded servers in `root` (stopped and started on the same folders), or, when the
    session's servers are containers (`make test-containers`), containers of the test's own
    (stopped and started again, on the same port).

    With `shared` (a database URL and a Redis URL), no server of its own: the test kills
    services, never the servers, and gets those URLs (its own database and key prefix on
    the session's servers); stopping them is refused."""

    def __init__(self, root: Path | None, prefix: str, shared: tuple[str, str] | None = None):
        self.root = root
        self.names = StreamNames(prefix)
        self._postgres: EmbeddedPostgres | None = None
        self._redis: EmbeddedRedis | None = None
        self._containers = contextlib.ExitStack()
        self._in_containers: tuple[containers.Server, containers.Server] | None = None
        self.shared = shared is not None
        if shared is not None:
            self.database_url, self.redis_url = shared
            return
        assert root is not None, "servers of the test's own need a folder"
        try:
            if containers.in_use():
                self._in_containers = (
                    self._containers.enter_context(containers.postgres_server()),
                    self._containers.enter_context(containers.redis_server()),
                )
                self.database_url, self.redis_url = (s.url for s in self._in_containers)
                return
            self._postgres = start_postgres(root / "pg")
            self._redis = start_redis(root / "redis", appendonly=False)
        except BaseException:
            self.close()
            raise
        self.database_url = self._postgres.url
        self.redis_url = self._redis.url

    def _own_folder(self) -> Path:
        """The folder of the test's own servers; refused when the servers are the session's."""
        assert not self.shared, "the servers are the session's: mark the test own_servers"
        assert self.root is not None
        return self.root

    def stop_postgres(self) -> None:
        self._own_folder()
        if self._in_containers is not None:
            self._in_containers[0].stop()
            return
        assert self._postgres is not None, "postgres is not running"
        stopped, self._postgres = self._postgres, None
        stopped.stop()
        wait_until(lambda: process_exited(stopped.pid), timeout=30, message="postgres to exit")

    def start_postgres(self) -> None:
        root = self._own_folder()
        if self._in_containers is not None:
            self._in_containers[0].start()
            return
        assert self._postgres is None, "postgres is running already"
        self._postgres = start_postgres(root / "pg")
        assert self._postgres.url == self.database_url, "postgres came back on another socket"

    def restart_redis(self) -> None:
        """Stop Redis and start it again: without persistence, empty."""
        root = self._own_folder()
        if self._in_containers is not None:
            self._in_containers[1].stop()
            self._in_containers[1].start()
            return
        assert self._redis is not None
        stopped, self._redis = self._redis, None
        stopped.stop()
        wait_until(lambda: process_exited(stopped.pid), timeout=30, message="redis to exit")
        self._redis = start_redis(root / "redis", appendonly=False)
        assert self._redis.url == self.redis_url, "redis came back on another socket"

    def close(self) -> None:
        """Stop both servers (each by its pid, or remove their containers); remove the folder."""
        try:
            self._containers.close()
            if self._redis is not None:
                self._redis.stop()
        finally:
            try:
                if self._postgres is not None:
                    self._postgres.stop()
            finally:
                if self.root is not None:
                    shutil.rmtree(self.root, ignore_errors=True)

    def tcp_ports(self) -> list[int]:
        """The 127.0.0.1 ports of the two servers: none for the embedded ones (unix sockets)."""
        ports = (urlsplit(url).port for url in (self.database_url, self.redis_url))
        return [port for port in ports if port is not None]

    def redis_client(self) -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_url(self.redis_url)


class Services:
    """Starts ingest and workers as processes against one test's backends, and stops every
    one of them (by pid) at the end."""

    def __init__(self, backends: Backends, origin: ImageOrigin, folder: Path) -> None:
        self.backends = backends
        self.folder = folder
        self.env = {
            "IMGPIPE_DATABASE_URL": backends.database_url,
            "IMGPIPE_REDIS_URL": backends.redis_url,
            "IMGPIPE_REDIS_PREFIX": backends.names.prefix,
            "IMGPIPE_STORAGE_URL": (folder / "store").as_uri(),
            "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}",
            **TUNING,
        }
        self.started: list[Service] = []

    def start(
        self,
        module: str,
        name: str,
        extra: dict[str, str],
        *,
        process_group: int | None = None,
        launcher: Sequence[str] = (),
    ) -> Service:
        """`process_group` and `launcher` as in testing.services.start_service."""
        listen = f"127.0.0.1:{free_tcp_port()}"
        log = self.folder / f"{name}.log"
        process = start_service(
            module,
            {**self.env, "IMGPIPE_GRPC_LISTEN": listen, **extra},
            log,
            process_group=process_group,
            launcher=launcher,
        )
        service = Service(name, process, log, listen, grpc.aio.insecure_channel(listen))
        self.started.append(service)
        return service

    def start_ingest(
        self, name: str = "ingest", *, failpoints: str = "", **settings: str
    ) -> Service:
        """An ingest; `settings` are more IMGPIPE_* variables (IMGPIPE_SCHEDULER_WINDOW=...)."""
        extra = {"IMGPIPE_FAILPOINTS": failpoints} if failpoints else {}
        return self.start("services.ingest", name, extra | settings)

    def start_worker(self, name: str, *, failpoints: str = "", **settings: str) -> Service:
        """A worker whose consumer name is `name`: a new name is a new pod. `settings` are
        more IMGPIPE_* variables (IMGPIPE_FETCH_PER_HOST=...)."""
        extra = {"IMGPIPE_FAILPOINTS": failpoints} if failpoints else {}
        return self.start(
            "services.worker", name, {"IMGPIPE_CONSUMER_NAME": name} | extra | settings
        )

    async def wait_serving(self, *services: Service, within: float = 60.0) -> None:
        for service in services:

            async def serving(service: Service = service) -> bool:
                if service.process.poll() is not None:
                    raise AssertionError(
                        f"{service.name} exited with {service.process.returncode}:\n"
                        + service.tail()
                    )
                return await service.health() == SERVING

            await wait_until_async(
                serving,
                timeout=within,
                interval=0.1,
                message=f"{service.name} to report SERVING",
                ignore=(grpc.aio.AioRpcError,),
            )

    async def kill(self, service: Service) -> None:
        """kill -9, and wait until it is gone."""
        os.kill(service.pid, signal.SIGKILL)
        code = await service.wait_exit(10)
        assert code == -signal.SIGKILL, f"{service.name} exited with {code}, not by SIGKILL"

    def report(self) -> str:
        """The end of every service's log, for assertion messages."""
        parts = []
        for service in self.started:
            state = service.process.poll()
            status = "running" if state is None else f"exited {state}"
            parts.append(f"--- {service.name} (pid {service.pid}, {status}) ---\n{service.tail()}")
        return "\n".join(parts)

    async def close(self) -> None:
        for service in self.started:
            if service.process.poll() is None:
                os.kill(service.pid, signal.SIGKILL)
        for service in self.started:
            await asyncio.to_thread(service.process.wait, 10)
            await service.channel.close(None)


# --- requests ---------------------------------------------------------------------------------


async def final_images(backends: Backends, request_id: str) -> int:
    """How many of the request's images are Done or Failed (a connection of its own, so it
    works across a Postgres restart)."""
    connection = await asyncpg.connect(backends.database_url)
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM images WHERE request_id = $1 AND status <> 'Pending'",
            uuid.UUID(request_id),
        )
    finally:
        await connection.close()
    return int(count)


async def wait_some_final(
    backends: Backends, services: Services, request_id: str, total: int, at_least: int
) -> int:
    """Wait until `at_least` images are final; fail if all of them are (the fault would come
    too late to mean anything). Returns how many are final."""

    async def enough() -> int | None:
        count = await final_images(backends, request_id)
        return count if count >= at_least else None

    try:
        count = await wait_until_async(
            enough, timeout=COMPLETION_TIMEOUT, interval=0.05, message=f"{at_least} final images"
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{services.report()}") from None
    assert count < total, f"the request finished before the fault ({count}/{total} final)"
    return count


# --- the checks after every fault -----------------------------------------------------------


@dataclass
class Snapshot:
    """What Postgres and Redis say about one request."""

    request_status: str | None = None
    images_total: int = 0
    images_done: int = 0
    images_failed: int = 0
    image_rows: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    pending: int | str = "?"
    consumers: list[Any] = field(default_factory=list)
    tasks_length: int | str = "?"
    dead_letters: int | str = "?"
    finished_events: int | str = "?"

    def __str__(self) -> str:
        return (
            f"request {self.request_status}: total={self.images_total} "
            f"done={self.images_done} failed={self.images_failed}; image rows "
            f"{self.image_rows} {self.by_status}; XPENDING {self.pending} {self.consumers}; "
            f"XLEN tasks {self.tasks_length}, dead {self.dead_letters}; "
            f"request.finished events {self.finished_events}"
        )


async def take_snapshot(backends: Backends, request_id: str) -> Snapshot:
    snapshot = Snapshot()
    try:
        connection = await asyncpg.connect(backends.database_url)
        try:
            row = await connection.fetchrow(
                """SELECT status, images_total, images_done, images_failed
                     FROM requests WHERE id = $1""",
                uuid.UUID(request_id),
            )
            statuses = await connection.fetch(
                "SELECT status, count(*) AS n FROM images WHERE request_id = $1 GROUP BY status",
                uuid.UUID(request_id),
            )
        finally:
            await connection.close()
        if row is not None:
            snapshot.request_status = row["status"]
            snapshot.images_total = row["images_total"]
            snapshot.images_done = row["images_done"]
            snapshot.images_failed = row["images_failed"]
        snapshot.by_status = {r["status"]: r["n"] for r in statuses}
        snapshot.image_rows = sum(snapshot.by_status.values())
    except (OSError, asyncpg.PostgresError) as exc:
        snapshot.request_status = f"(postgres: {exc!r})"

    names = backends.names
    client = backends.redis_client()
    try:
        snapshot.tasks_length = await client.xlen(names.tasks)
        snapshot.dead_letters = await client.xlen(names.dead)
        events = await stream_messages(client, names.events, EVENT_FIELD, request_pb2.RequestEvent)
        snapshot.finished_events = sum(
            1
            for event in events
            if event.request_id == request_id
            and event.type == request_pb2.REQUEST_EVENT_TYPE_FINISHED
        )
        summary: Any = await client.xpending(names.tasks, WORKER_GROUP)
        snapshot.pending = int(summary["pending"])
        snapshot.consumers = summary["consumers"]
    except (OSError, RedisError) as exc:
        # NOGROUP included: nobody recreated the group after Redis lost it.
        snapshot.pending = f"(redis: {exc!r})"
    finally:
        await client.aclose()
    return snapshot


async def assert_clean(
    backends: Backends, services: Services, request_id: str, *, images: int
) -> Snapshot:
    """Wait for the request to be final, then check every promise of the fault tests:
    every image final exactly once (all Done: every URL is good), counters equal to the rows,
    nothing pending on the stream, the request Completed, request.finished published once,
    nothing dead-lettered."""

    def explain(problem: str, snapshot: Snapshot) -> str:
        return f"{problem}\nstate: {snapshot}\n{services.report()}"

    async def settled(what: str, done: Any, within: float) -> None:
        async def check() -> Snapshot | None:
            snapshot = await take_snapshot(backends, request_id)
            return snapshot if done(snapshot) else None

        try:
            await wait_until_async(check, timeout=within, interval=0.2, message=what)
        except AssertionError as exc:
            raise AssertionError(
                explain(str(exc), await take_snapshot(backends, request_id))
            ) from None

    await settled(
        "the request to be final",
        lambda s: s.request_status in ("Completed", "Failed"),
        COMPLETION_TIMEOUT,
    )
    # The last ack follows the last commit, and the event follows the finish.
    await settled("no pending stream entry", lambda s: s.pending == 0, SETTLE_TIMEOUT)
    await settled(
        "request.finished on the events stream",
        lambda s: isinstance(s.finished_events, int) and s.finished_events >= 1,
        SETTLE_TIMEOUT,
    )

    snapshot = await take_snapshot(backends, request_id)
    problems = []
    if snapshot.request_status != "Completed":
        problems.append(f"request is {snapshot.request_status}, not Completed")
    if snapshot.by_status != {"Done": images}:
        problems.append(f"images by status {snapshot.by_status}, expected all {images} Done")
    if not (
        snapshot.images_done + snapshot.images_failed
        == snapshot.images_total
        == snapshot.image_rows
        == images
    ):
        problems.append("counters differ from the image rows")
    if snapshot.images_done != snapshot.by_status.get("Done", 0):
        problems.append("images_done differs from the Done rows")
    if snapshot.pending != 0:
        problems.append(f"{snapshot.pending} stream entries still pending")
    if snapshot.finished_events != 1:
        problems.append(f"request.finished published {snapshot.finished_events} times")
    if snapshot.dead_letters != 0:
        problems.append(f"{snapshot.dead_letters} dead-lettered tasks")
    assert not problems, explain("; ".join(problems), snapshot)
    return snapshot
