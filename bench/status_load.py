"""B4 status under load: GET /status/<id> at a fixed rate from a second process.

The request read is a completed one of `status_products` products (one photo each), fetched
with the default page (100 products), so every answer carries the whole request. The load
comes from `python -m bench.loadgen`, an open-loop generator in a process of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from functools import partial

import aiohttp

from bench.corpus import Corpus
from bench.cpu import CpuMeter
from bench.pipeline import log, process, running_stack
from bench.procs import measured
from bench.report import Section, Target, cpu_lines, median, table
from bench.settings import BenchSettings
from testing.origin import serve_images
from testing.stack import ROOT

P99_TARGET_MS = 20.0
REQUEST_TIMEOUT = 5.0


async def run(settings: BenchSettings, corpus: Corpus) -> Section:
    results: list[dict[str, object]] = []
    meter = CpuMeter()
    async with serve_images(corpus.size) as origin:
        urls = corpus.serve(origin, settings.status_products)
        env = {
            "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}",
            "IMGPIPE_DEV_WORKERS": str(settings.workers),
        }
        with running_stack(env) as stack:
            async with aiohttp.ClientSession() as http:
                request_id, _ = await process(http, stack, urls, "b4", within=300, per_row=1)
            target = f"{stack.base_url}/status/{request_id}"
            for i in range(settings.runs):
                with meter.measure(partial(measured, stack)):
                    result = await _load(target, settings.status_rate, settings.status_seconds)
                results.append(result)
                log(
                    f"B4 run {i + 1}/{settings.runs}: p50 {result['p50_ms']} ms,"
                    f" p99 {result['p99_ms']} ms, errors {result['errors']}"
                )
    return _section(settings, results, meter)


async def _load(url: str, rate: int, seconds: float) -> dict[str, object]:
    """One run of the load generator process; killed (by its pid) if it overstays."""
    generator = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        url,
        f"--rate={rate}",
        f"--seconds={seconds}",
        f"--timeout={REQUEST_TIMEOUT}",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        out, _ = await asyncio.wait_for(generator.communicate(), seconds + REQUEST_TIMEOUT + 30)
    except TimeoutError:
        generator.kill()
        await generator.wait()
        raise RuntimeError("the load generator overstayed its hard deadline") from None
    if generator.returncode != 0:
        raise RuntimeError(f"the load generator exited with {generator.returncode}")
    result: dict[str, object] = json.loads(out)
    return result


def _cost(results: list[dict[str, object]], meter: CpuMeter) -> str:
    """What one status request costs the stack in CPU, and the rate that would fill the cores."""
    sent = sum(int(str(r["sent"])) for r in results)
    per_request = 1000 * meter.stack_seconds() / sent
    parts = ", ".join(
        f"{name} {1000 * meter.seconds.get(name, 0.0) / sent:.2f}"
        for name in ("status", "gateway", "postgres")
    )
    cores = os.cpu_count() or 1
    return (
        f"Stack CPU per request: {per_request:.2f} ms ({parts}), so {cores} fully busy cores"
        f" serve at most about {1000 * cores / per_request:.0f} requests/s, load generator"
        " aside."
    )


def _figure(results: list[dict[str, object]], key: str) -> float:
    return median([float(str(r[key])) for r in results])


def _section(settings: BenchSettings, results: list[dict[str, object]], meter: CpuMeter) -> Section:
    p50, p99 = _figure(results, "p50_ms"), _figure(results, "p99_ms")
    errors = sum(int(str(r["errors"])) for r in results)
    rows = [
        (
            i + 1,
            r["sent"],
            r["ok"],
            r["errors"],
            r["p50_ms"],
            r["p90_ms"],
            r["p99_ms"],
            r["max_ms"],
            r["send_lag_p99_ms"],
            r["client_cpu_s"],
        )
        for i, r in enumerate(results)
    ]
    lines = [
        f"GET /status/<id> of a completed request of {settings.status_products} products"
        f" (default page: all of them), {settings.status_rate} requests/s for"
        f" {settings.status_seconds:g} s per run, from `python -m bench.loadgen` (open loop,"
        f" aiohttp, at most 256 connections, {REQUEST_TIMEOUT:g} s per request). Latency from"
        " the scheduled send time to the end of the body; send lag is how late the generator"
        " itself sent (part of the latency). wrk is not used: it is closed-loop (wrk2 is the"
        " fixed-rate one) and not installed here.",
        "",
        *table(
            (
                "run",
                "sent",
                "ok",
                "errors",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "send lag p99 ms",
                "generator CPU s",
            ),
            rows,
        ),
        "",
        _cost(results, meter),
        "",
        *cpu_lines(meter.table(), meter.wall, "the load (the generator is 'other')"),
    ]
    return Section(
        "B4",
        "status under load",
        lines,
        {
            "runs": results,
            "median_p50_ms": p50,
            "median_p99_ms": p99,
            "errors": errors,
            "cpu": meter.table(),
        },
        [
            Target("B4", "p50 latency", f"{p50:.1f} ms", "—", None),
            Target(
                "B4",
                "p99 latency",
                f"{p99:.1f} ms",
                f"≤ {P99_TARGET_MS:.0f} ms",
                p99 <= P99_TARGET_MS,
            ),
            Target("B4", "errors (all runs)", str(errors), "0", errors == 0),
        ],
    )
