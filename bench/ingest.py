"""B3 ingest: a large CSV streamed to POST /upload; time to the 202 and peak RSS, by size.

Each upload runs on a fresh stack, so VmHWM (a lifetime peak) of the gateway and of ingest is
the peak of start-up plus that one upload. The URLs point at 127.0.0.1 on a port nothing
listens on; the stack runs one worker and no IMGPIPE_FETCH_ALLOW, so that worker refuses
every URL by its address policy, without a connection. The CSV is generated row by row and
streamed in 64 KiB chunks: the bench never holds the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from bench.cpu import CpuMeter
from bench.pipeline import log, running_stack, upload
from bench.procs import measured, memory_mb, stack_processes
from bench.report import Section, Target, cpu_lines, median, table
from bench.settings import BenchSettings
from services.local.embedded import EmbeddedRedis, start_redis
from testing.ports import free_tcp_port
from testing.stack import Stack

CHUNK = 64 * 1024
ROLES = ("gateway", "ingest")
TIME_TARGET = 10.0
MEMORY_TARGET = 150.0
REDIS_TARGET = 20.0  # MB of Redis used_memory above its level before the upload
REDIS_WATCH_SECONDS = 20.0
FLAT = 0.10  # "flat": the largest upload's peak is within 10 % of the smallest's


def csv_rows(rows: int, per_row: int, port: int, tag: str) -> Iterator[str]:
    yield "S. No.,Product Name,Input Image Urls\n"
    for row in range(1, rows + 1):
        urls = ",".join(f"http://127.0.0.1:{port}/b3/{tag}/{row}-{k}.jpg" for k in range(per_row))
        yield f'{tag}-{row},Product {row},"{urls}"\n'


async def csv_chunks(rows: int, per_row: int, port: int, tag: str) -> AsyncIterator[bytes]:
    pending: list[str] = []
    size = 0
    for line in csv_rows(rows, per_row, port, tag):
        pending.append(line)
        size += len(line)
        if size >= CHUNK:
            yield "".join(pending).encode()
            pending, size = [], 0
    if pending:
        yield "".join(pending).encode()


async def run(settings: BenchSettings) -> Section:
    closed_port = free_tcp_port()  # nothing listens there; the workers never connect anyway
    env = {"IMGPIPE_DEV_WORKERS": "1"}
    by_size: dict[int, dict[str, list[float]]] = {}
    meters = {rows: CpuMeter() for rows in settings.ingest_rows}
    for rows in settings.ingest_rows:
        figures: dict[str, list[float]] = {"seconds": [], "redis_growth_mb": []}
        for role in ROLES:
            figures[f"{role}_idle_mb"], figures[f"{role}_peak_mb"] = [], []
        for i in range(settings.runs):
            with _redis() as redis, running_stack(env | {"IMGPIPE_REDIS_URL": redis.url}) as stack:
                idle = _vm(stack)
                before = await _used_memory(redis.url)
                body = csv_chunks(rows, settings.urls_per_row, closed_port, f"r{i}")
                timeout = aiohttp.ClientTimeout(total=600)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    with meters[rows].measure(partial(measured, stack)):
                        accepted = await upload(http, stack, body)
                # The feeder releases a window at a time after the 202 while the worker turns
                # the tasks down: Redis is watched for a while, the largest reading kept.
                redis_mb = await _watch_redis(redis.url) - before
                peak = _vm(stack)
            if accepted.products != rows or accepted.images != rows * settings.urls_per_row:
                raise RuntimeError(f"ingest accepted {accepted}, expected {rows} rows")
            figures["seconds"].append(accepted.seconds)
            figures["redis_growth_mb"].append(redis_mb)
            for role in ROLES:
                figures[f"{role}_idle_mb"].append(idle[role])
                figures[f"{role}_peak_mb"].append(peak[role])
            log(
                f"B3 {rows} rows run {i + 1}/{settings.runs}: 202 after {accepted.seconds:.1f} s,"
                f" Redis +{redis_mb:.1f} MB,"
                f" peak gateway {peak['gateway']:.0f} MB, ingest {peak['ingest']:.0f} MB"
            )
        by_size[rows] = figures
    return _section(settings, by_size, meters[max(meters)])


@contextlib.contextmanager
def _redis() -> Iterator[EmbeddedRedis]:
    """A Redis of the run's own, so its memory is the stack's alone."""
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-redis-") as tmp:
        redis = start_redis(Path(tmp))
        try:
            yield redis
        finally:
            redis.stop()


async def _used_memory(url: str) -> float:
    """Redis INFO used_memory, in MB."""
    client = aioredis.Redis.from_url(url)
    try:
        info = await client.info("memory")
    finally:
        await client.aclose()
    return int(info["used_memory"]) / 1e6


async def _watch_redis(url: str) -> float:
    """The largest used_memory over REDIS_WATCH_SECONDS, in MB."""
    largest = 0.0
    deadline = time.perf_counter() + REDIS_WATCH_SECONDS
    while time.perf_counter() < deadline:
        largest = max(largest, await _used_memory(url))
        await asyncio.sleep(0.5)  # a sampling interval, not synchronisation
    return largest


def _vm(stack: Stack) -> dict[str, float]:
    groups = stack_processes(stack)
    return {role: memory_mb(groups[role][0]) or float("nan") for role in ROLES}


def _section(
    settings: BenchSettings, by_size: dict[int, dict[str, list[float]]], meter: CpuMeter
) -> Section:
    med = {rows: {k: median(v) for k, v in figures.items()} for rows, figures in by_size.items()}
    rows_table = [
        (
            f"{rows:,}",
            f"{rows * settings.urls_per_row:,}",
            f"{m['seconds']:.2f}",
            f"{m['redis_growth_mb']:.1f}",
            f"{m['gateway_peak_mb']:.0f} (idle {m['gateway_idle_mb']:.0f})",
            f"{m['ingest_peak_mb']:.0f} (idle {m['ingest_idle_mb']:.0f})",
        )
        for rows, m in med.items()
    ]
    smallest, largest = med[min(med)], med[max(med)]
    targets = [
        Target(
            "B3",
            f"time to 202, {max(med):,} rows",
            f"{largest['seconds']:.1f} s",
            f"≤ {TIME_TARGET:.0f} s",
            largest["seconds"] <= TIME_TARGET,
        )
    ]
    redis_growth = max(m["redis_growth_mb"] for m in med.values())
    targets.append(
        Target(
            "B3",
            f"Redis used_memory growth, {max(med):,} rows",
            f"{redis_growth:+.1f} MB",
            f"< {REDIS_TARGET:.0f} MB",
            redis_growth < REDIS_TARGET,
        )
    )
    for role in ROLES:
        peak = max(m[f"{role}_peak_mb"] for m in med.values())
        growth = largest[f"{role}_peak_mb"] / smallest[f"{role}_peak_mb"] - 1
        targets += [
            Target(
                "B3",
                f"{role} peak RSS",
                f"{peak:.0f} MB",
                f"< {MEMORY_TARGET:.0f} MB",
                peak < MEMORY_TARGET,
            ),
            Target(
                "B3",
                f"{role} peak, {max(med):,} vs {min(med):,} rows",
                f"{growth:+.0%}",
                f"flat (≤ +{FLAT:.0%})",
                growth <= FLAT,
            ),
        ]
    lines = [
        f"CSV of N rows with {settings.urls_per_row} URLs each, generated and streamed as a"
        " text/csv body in 64 KiB chunks. Time from the start of the POST to the 202. Redis"
        " growth: the largest used_memory of the run's own Redis during the"
        f" {REDIS_WATCH_SECONDS:g} s after the 202, less its level before the upload (the"
        " feeder releases a window at a time: docs/scheduling.md). Peak RSS is VmHWM of a"
        " fresh stack per upload, read after that: start-up, this upload and the first of its"
        " feeding; idle is VmHWM before the upload. One worker, no"
        " IMGPIPE_FETCH_ALLOW: it refuses the 127.0.0.1 URLs by address policy, without"
        " connecting.",
        "",
        *table(
            (
                "rows",
                "URLs",
                "time to 202, s",
                "Redis growth, MB",
                "gateway peak MB",
                "ingest peak MB",
            ),
            rows_table,
        ),
        "",
        *cpu_lines(meter.table(), meter.wall, f"the {max(med):,}-row uploads (POST to 202)"),
    ]
    data = {
        "urls_per_row": settings.urls_per_row,
        "runs": {str(rows): figures for rows, figures in by_size.items()},
        "median": {str(rows): m for rows, m in med.items()},
        "cpu": meter.table(),
    }
    return Section("B3", "ingest", lines, data, targets)
