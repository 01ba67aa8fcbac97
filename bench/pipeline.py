"""Driving the real stack: start it, upload a CSV, wait until the request is final.

Every stack is `python -m services.local` in a fresh temporary folder (embedded Postgres and
Redis), started by testing/stack.py and stopped by its launcher's pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.settings import stack_env
from services.common.capacity import WORKER_CONCURRENCY
from testing.stack import Stack, start_stack

CSV_HEADERS = {"Content-Type": "text/csv"}
POLL_SECONDS = 0.2  # how often the client asks for the status; the end time is the server's
STALL_SECONDS = 60.0  # no image became final for this long: the stack is stuck, give up
Body = bytes | AsyncIterator[bytes]


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def running_stack(env: dict[str, str]) -> Iterator[Stack]:
    """The whole stack in a fresh data folder; stopped (SIGTERM to the launcher) on exit."""
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as tmp:
        stack = start_stack(Path(tmp), stack_settings(env, os.environ))
        try:
            yield stack
        finally:
            stack.stop()


def stack_settings(env: dict[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """What a benchmark's stack starts with: the benchmarks' defaults, then
    IMGPIPE_BENCH_STACK_ENV, then the benchmark's own `env`, which wins: it is its design."""
    # Benchmarks send the same photos again and again to one stack: reusing earlier outputs
    # would measure copies, not compression. B12 switches it on where it is the subject.
    defaults = {"IMGPIPE_LOG_LEVEL": "WARNING", "IMGPIPE_REUSE_OUTPUTS": "off"}
    return defaults | dict(stack_env(environ)) | env


def worker_concurrency(env: dict[str, str]) -> int:
    """The slots of each worker of a stack started with `env`."""
    settings = stack_settings(env, os.environ)
    return int(settings.get("IMGPIPE_WORKER_CONCURRENCY", WORKER_CONCURRENCY))


def csv_lines(urls: Sequence[str], per_row: int, tag: str) -> Iterator[str]:
    """The input CSV, line by line: `per_row` URLs per product, serial numbers `<tag>-<n>`."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for row, start in enumerate(range(0, len(urls), per_row), start=1):
        writer.writerow([f"{tag}-{row}", f"Product {row}", ",".join(urls[start : start + per_row])])
        yield out.getvalue()
        out.seek(0)
        out.truncate()


def csv_bytes(urls: Sequence[str], per_row: int, tag: str) -> bytes:
    return "".join(csv_lines(urls, per_row, tag)).encode()


@dataclass(frozen=True, slots=True)
class Accepted:
    request_id: str
    products: int
    images: int
    seconds: float  # from the start of the POST to the end of the 202 response
    started_at: float  # wall clock (time.time()) at the start of the POST


async def upload(
    http: aiohttp.ClientSession,
    stack: Stack,
    body: Body,
    query: dict[str, str] | None = None,
    *,
    api_key: str = "",
) -> Accepted:
    started_at, started = time.time(), time.perf_counter()
    headers = CSV_HEADERS | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    url = f"{stack.base_url}/upload"
    async with http.post(url, data=body, headers=headers, params=query) as response:
        answer = await response.json()
        if response.status != 202:
            raise RuntimeError(f"upload answered {response.status}: {answer}")
    return Accepted(
        answer["request_id"],
        answer["products"],
        answer["images"],
        time.perf_counter() - started,
        started_at,
    )


async def wait_final(
    http: aiohttp.ClientSession, stack: Stack, request_id: str, within: float
) -> dict[str, Any]:
    """The status once Completed or Failed; RuntimeError after `within` seconds, or after
    STALL_SECONDS without an image becoming final (with the end of the stack's log)."""
    now = time.perf_counter()
    deadline, last_change, last_final = now + within, now, -1
    url = f"{stack.base_url}/status/{request_id}?page_size=1"
    while (now := time.perf_counter()) < deadline and now - last_change < STALL_SECONDS:
        async with http.get(url) as response:
            status: dict[str, Any] = await response.json()
        if status.get("status") in ("Completed", "Failed"):
            return status
        progress = status.get("progress") or {}
        final = progress.get("images_done", 0) + progress.get("images_failed", 0)
        if final != last_final:
            last_final, last_change = final, now
        await asyncio.sleep(POLL_SECONDS)  # the client's polling interval, not synchronisation
    raise RuntimeError(
        f"request {request_id} stuck at {last_final} final images:\n{stack.log_tail(20)}"
    )


async def process(
    http: aiohttp.ClientSession,
    stack: Stack,
    urls: Sequence[str],
    tag: str,
    *,
    within: float,
    per_row: int = 10,
    query: dict[str, str] | None = None,
) -> tuple[str, float]:
    """Seconds from the start of the POST until the request was Completed (the server's
    completed_at, so the polling interval adds nothing), with the request id; every image
    must succeed."""
    accepted = await upload(http, stack, csv_bytes(urls, per_row, tag), query)
    status = await wait_final(http, stack, accepted.request_id, within)
    progress = status["progress"]
    if status["status"] != "Completed" or progress["images_done"] != len(urls):
        raise RuntimeError(f"request {accepted.request_id} ended {status['status']}: {progress}")
    completed = datetime.fromisoformat(str(status["completed_at"])).timestamp()
    return accepted.request_id, completed - accepted.started_at


async def output_bytes(http: aiohttp.ClientSession, stack: Stack, request_id: str) -> int:
    """The total size of a request's outputs, from its status pages."""
    total, token = 0, ""
    for _ in range(10_000):  # pages of 1,000 products: 10 million products at most
        url = f"{stack.base_url}/status/{request_id}?page_size=1000&page_token={token}"
        async with http.get(url) as response:
            status: dict[str, Any] = await response.json()
        total += sum(sum(p.get("output_bytes") or []) for p in status["products"])
        token = status.get("next_page_token") or ""
        if not token:
            return total
    raise RuntimeError(f"request {request_id}: too many status pages")
