"""B7 scale-out: one worker group against two, sharing one Postgres, one Redis and one
SeaweedFS.

A group is what tests/fault/test_scale_out.py kills: an ingest and two workers in one process
group. Both configurations get the same workload, two requests of half the images each,
submitted at once (with one group both go through its ingest), on the same Postgres, Redis and
SeaweedFS (a Redis prefix and a bucket prefix per configuration).

Latency-bound on purpose: two cores cannot add up CPU-bound work, whatever the design. The
photos are small (400×300), the origin waits before each one and every worker holds a fixed
number of tasks in flight, so a group is limited by its tasks in flight, not by the CPU; the
ratio then shows whether the shared coordination (one Redis stream, one consumer group, one
Postgres) lets two groups add up. The report gives the machine's CPU share, so a reader can see
the cores were not the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path

import asyncpg
import grpc

from bench.cpu import CpuMeter
from bench.pipeline import log
from bench.procs import Groups
from bench.report import Section, Target, median, table
from bench.settings import BenchSettings
from services.local.embedded import EmbeddedPostgres, EmbeddedRedis, start_postgres, start_redis
from testing.imagegen import photo_like
from testing.origin import ImageOrigin, serve_images
from testing.polling import wait_until_async
from testing.ports import free_tcp_port
from testing.processes import descendants
from testing.seaweed import BUCKET, SeaweedS3, start_seaweed
from testing.services import SERVING, Service, start_service, submit

PHOTO = (400, 300)
DISTINCT_PHOTOS = 40  # URLs are all distinct; their bytes repeat
WORKERS_PER_GROUP = 2
WARMUP_IMAGES = 40
GRACE_SECONDS = 5
START_TIMEOUT = 90.0
RUN_TIMEOUT = 300.0
BENCH = "bench (origin, client)"  # CpuMeter leaves names starting "bench" out of the stack


@dataclass
class Shared:
    """What every group shares: Postgres, Redis, SeaweedFS and the image origin."""

    postgres: EmbeddedPostgres
    redis: EmbeddedRedis
    seaweed: SeaweedS3
    origin: ImageOrigin
    folder: Path


@dataclass
class Group:
    name: str
    ingest: Service
    workers: list[Service]

    @property
    def members(self) -> list[Service]:
        return [self.ingest, *self.workers]


async def run(settings: BenchSettings) -> Section:
    rates: dict[int, list[float]] = {}
    meters: dict[int, CpuMeter] = {}
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-b7-") as tmp:
        folder = Path(tmp)
        photos = await asyncio.to_thread(
            lambda: [photo_like(*PHOTO, seed=seed) for seed in range(DISTINCT_PHOTOS)]
        )
        async with serve_images(PHOTO, delay=settings.scaleout_delay) as origin:
            origin.served.update({f"/img/b7-{n}.jpg": photos[n] for n in range(len(photos))})
            with shared_backends(folder, origin) as shared:
                for groups in (1, 2):
                    rates[groups], meters[groups] = await measure(settings, shared, groups)
    return section(settings, rates, meters)


@contextlib.contextmanager
def shared_backends(folder: Path, origin: ImageOrigin) -> Iterator[Shared]:
    postgres = start_postgres(folder / "pg")
    try:
        redis = start_redis(folder / "redis", appendonly=False)
        try:
            seaweed = start_seaweed(folder / "seaweed")
            try:
                yield Shared(postgres, redis, seaweed, origin, folder)
            finally:
                seaweed.stop()
        finally:
            redis.stop()
    finally:
        postgres.stop()


async def measure(
    settings: BenchSettings, shared: Shared, groups: int
) -> tuple[list[float], CpuMeter]:
    """images/s of each run with `groups` groups, and the CPU they used."""
    env = {
        "IMGPIPE_DATABASE_URL": shared.postgres.url,
        "IMGPIPE_REDIS_URL": shared.redis.url,
        "IMGPIPE_REDIS_PREFIX": f"imgpipe-b7-{groups}-{secrets.token_hex(4)}",
        **shared.seaweed.env(f"s3://{BUCKET}/bench-b7-{groups}-{secrets.token_hex(4)}"),
        "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{shared.origin.port}",
        "IMGPIPE_WORKER_CONCURRENCY": str(settings.scaleout_concurrency),
        "IMGPIPE_GRACE_SECONDS": str(GRACE_SECONDS),
        "IMGPIPE_LOG_LEVEL": "WARNING",
        "IMGPIPE_REUSE_OUTPUTS": "off",  # the same photos under many URLs: compress each
    }
    started = [start_group(shared.folder, f"{groups}{chr(65 + g)}", env) for g in range(groups)]
    meter, rates = CpuMeter(), []
    try:
        for group in started:
            await wait_serving(group)
        await process(shared, started, WARMUP_IMAGES, f"warm{groups}")
        for i in range(settings.runs):
            with meter.measure(partial(processes, shared, started)):
                seconds = await process(shared, started, settings.scaleout_images, f"g{groups}r{i}")
            rates.append(settings.scaleout_images / seconds)
            log(f"B7 {groups} group(s) run {i + 1}/{settings.runs}: {rates[-1]:.1f} images/s")
    finally:
        for group in started:
            await stop_group(group)
    return rates, meter


def start_group(folder: Path, name: str, env: dict[str, str]) -> Group:
    """An ingest and its workers in one process group, led by the ingest."""
    members: list[Service] = []
    roles = [("services.ingest", f"{name}-ingest")]
    roles += [("services.worker", f"{name}-worker-{i}") for i in range(1, WORKERS_PER_GROUP + 1)]
    for module, member in roles:
        listen, log_path = f"127.0.0.1:{free_tcp_port()}", folder / f"{member}.log"
        extra = {"IMGPIPE_GRPC_LISTEN": listen, "IMGPIPE_CONSUMER_NAME": member}
        # The first process leads a new process group; the others join it.
        leader = members[0].pid if members else 0
        process = start_service(module, {**env, **extra}, log_path, process_group=leader)
        members.append(
            Service(member, process, log_path, listen, grpc.aio.insecure_channel(listen))
        )
    return Group(name, members[0], members[1:])


async def wait_serving(group: Group) -> None:
    for service in group.members:

        async def serving(service: Service = service) -> bool:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited at start:\n{service.tail()}")
            return await service.health() == SERVING

        await wait_until_async(
            serving,
            timeout=START_TIMEOUT,
            interval=0.1,
            message=f"{service.name} to report SERVING",
            ignore=(grpc.aio.AioRpcError,),
        )


async def stop_group(group: Group) -> None:
    """SIGTERM to the whole group (each drains and exits), SIGKILL if one does not."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group.ingest.pid, signal.SIGTERM)
    for service in group.members:
        try:
            await asyncio.to_thread(service.process.wait, GRACE_SECONDS + 10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group.ingest.pid, signal.SIGKILL)
            await asyncio.to_thread(service.process.wait, 10)
        await service.channel.close(None)


async def process(shared: Shared, groups: list[Group], images: int, tag: str) -> float:
    """Seconds from the submission of two requests of images/2 each (one per group's ingest,
    or both through the one) until the later one was Completed (Postgres' completed_at)."""
    halves = [
        [shared.origin.url(f"/img/{tag}-{half}-{n}.jpg") for n in range(images // 2)]
        for half in (0, 1)
    ]
    for urls in halves:
        for n, url in enumerate(urls):
            path = url.removeprefix(f"http://127.0.0.1:{shared.origin.port}")
            shared.origin.served[path] = shared.origin.served[f"/img/b7-{n % DISTINCT_PHOTOS}.jpg"]
    started_at = time.time()
    request_ids = await asyncio.gather(
        *(submit(groups[n % len(groups)].ingest, urls) for n, urls in enumerate(halves))
    )
    finished = await wait_completed(shared, groups, request_ids, images // 2)
    return max(finished) - started_at


async def wait_completed(
    shared: Shared, groups: list[Group], request_ids: list[str], images: int
) -> list[float]:
    """completed_at (epoch seconds) of each request once every one is final; RuntimeError
    unless each is Completed with every image done."""
    ids = [uuid.UUID(r) for r in request_ids]
    connection = await asyncpg.connect(shared.postgres.url)
    try:

        async def final() -> list[asyncpg.Record] | None:
            rows = await connection.fetch(
                """SELECT status, images_done, completed_at FROM requests
                    WHERE id = ANY($1::uuid[])""",
                ids,
            )
            return rows if all(row["completed_at"] is not None for row in rows) else None

        try:
            rows = await wait_until_async(
                final, timeout=RUN_TIMEOUT, interval=0.1, message="the requests to be final"
            )
        except AssertionError as exc:
            tails = "\n".join(f"--- {s.name}\n{s.tail(10)}" for g in groups for s in g.members)
            raise RuntimeError(f"{exc}\n{tails}") from None
    finally:
        await connection.close()
    for row in rows:
        if row["status"] != "Completed" or row["images_done"] != images:
            raise RuntimeError(f"a request ended {row['status']} with {row['images_done']} done")
    completed: list[datetime] = [row["completed_at"] for row in rows]
    return [moment.timestamp() for moment in completed]


def processes(shared: Shared, groups: list[Group]) -> Groups:
    """Every process of the measurement, by role, for the CPU meter."""
    found: Groups = {}
    for group in groups:
        found[f"group {group.name}"] = [service.pid for service in group.members]
    found["postgres"] = [shared.postgres.pid, *descendants(shared.postgres.pid)]
    found["redis"] = [shared.redis.pid]
    found["seaweedfs"] = [shared.seaweed.process.pid, *descendants(shared.seaweed.process.pid)]
    found[BENCH] = [os.getpid()]
    return found


def section(
    settings: BenchSettings, rates: dict[int, list[float]], meters: dict[int, CpuMeter]
) -> Section:
    cores = os.cpu_count() or 1
    med = {groups: median(values) for groups, values in rates.items()}
    ratio = med[2] / med[1]
    in_flight = WORKERS_PER_GROUP * settings.scaleout_concurrency
    bound = in_flight / settings.scaleout_delay  # images/s a group could not exceed
    rows = []
    cpu: dict[str, dict[str, float]] = {}
    for groups, values in sorted(rates.items()):
        meter = meters[groups]
        capacity = meter.wall * cores  # CPU seconds the machine had over the measured runs
        stack, bench = meter.stack_seconds(), meter.seconds.get(BENCH, 0.0)
        shares = cpu[str(groups)] = {
            "stack": stack / capacity,
            "bench": bench / capacity,
            "others": (meter.machine - stack - bench) / capacity,
            "idle": meter.idle_share(cores),
            "stack_cpu_ms_per_image": 1000 * stack / (settings.scaleout_images * len(values)),
        }
        rows.append(
            (
                groups,
                ", ".join(f"{r:.1f}" for r in values),
                f"{med[groups]:.1f}",
                f"{med[groups] / (bound * groups):.0%}",
                f"{shares['stack_cpu_ms_per_image']:.1f}",
                " / ".join(f"{shares[k]:.0%}" for k in ("stack", "bench", "others", "idle")),
            )
        )
    two = meters[2]
    by_process = sorted(two.seconds.items(), key=lambda item: -item[1])
    lines = [
        f"{settings.scaleout_images} photos of {PHOTO[0]}×{PHOTO[1]} per run, as two requests"
        " of half each submitted at once (with two groups, one through each group's ingest)."
        f" A group is an ingest and {WORKERS_PER_GROUP} workers in one process group; every"
        " group shares one Postgres, one Redis and one SeaweedFS (its own Redis and bucket"
        f" prefix per configuration). The origin waits {settings.scaleout_delay:g} s before"
        f" each image and each worker holds {settings.scaleout_concurrency} tasks in flight"
        f" (IMGPIPE_WORKER_CONCURRENCY), so a group cannot exceed {in_flight} ÷"
        f" {settings.scaleout_delay:g} s = {bound:.0f} images/s whatever the CPU:"
        f" latency-bound on purpose, because CPU-bound work cannot add up on {cores} cores."
        " The ratio shows whether the shared coordination (one stream, one consumer group,"
        " one Postgres) lets groups add up; 2.00× would be perfectly additive. Time runs"
        " from the start of the two uploads to the later request's completed_at.",
        "",
        *table(
            (
                "groups",
                "runs, images/s",
                "median images/s",
                "of the in-flight bound",
                "stack CPU ms/image",
                "machine CPU: stack / bench / others / idle",
            ),
            rows,
        ),
        "",
        f"**2 groups ÷ 1 group: {ratio:.2f}×.** Machine CPU is the share of all {cores} cores"
        " over the measured runs: the stack (both groups' services, Postgres, Redis and"
        " SeaweedFS), the bench's own process (the origin and the client), other people's"
        " work on the machine, and what stayed idle.",
        "",
        f"CPU by process during the 2-group runs ({two.wall:.1f} s of wall time; 100 % = one"
        " core busy):",
        "",
        *table(
            ("process", "CPU s", "% of one core"),
            [(name, f"{used:.2f}", f"{100 * used / two.wall:.1f}") for name, used in by_process],
        ),
    ]
    return Section(
        "B7",
        "scale-out",
        lines,
        {
            "images": settings.scaleout_images,
            "photo": list(PHOTO),
            "origin_delay_s": settings.scaleout_delay,
            "worker_concurrency": settings.scaleout_concurrency,
            "workers_per_group": WORKERS_PER_GROUP,
            "images_per_s": {str(g): r for g, r in rates.items()},
            "median": {str(g): r for g, r in med.items()},
            "ratio_2_to_1": ratio,
            "cpu": cpu,
        },
        [
            Target("B7", "images/s with 1 group", f"{med[1]:.1f}", "—", None),
            Target("B7", "images/s with 2 groups", f"{med[2]:.1f}", "—", None),
            Target("B7", "2 groups / 1 group (latency-bound)", f"{ratio:.2f}×", "—", None),
        ],
    )
