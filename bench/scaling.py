"""B6 scaling: pipeline images/s with 1, 2 and 4 worker processes, as a table and a PNG.

A fresh stack per worker count; the same photos and the same upload as B1. Each worker runs
one codec thread, as a worker with a 1-CPU limit does by default, so that N workers are N cores'
worth of codec and the line from one worker is what linear scale-out would give. (At its
default of one thread per usable core, a single worker already uses every core of the machine.)
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import aiohttp

from bench.chart import line_chart
from bench.corpus import Corpus
from bench.cpu import CpuMeter
from bench.pipeline import log, process, running_stack
from bench.procs import measured
from bench.report import Section, Target, median, table
from bench.settings import BenchSettings
from testing.origin import serve_images

WARMUP_IMAGES = 40
TIMEOUT = 900.0


async def run(settings: BenchSettings, corpus: Corpus, png: Path) -> Section:
    count = settings.images
    by_workers: dict[int, list[float]] = {}
    meters: dict[int, CpuMeter] = {}
    async with serve_images(corpus.size) as origin:
        urls = corpus.serve(origin, count)
        for workers in settings.scaling_workers:
            env = {
                "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}",
                "IMGPIPE_DEV_WORKERS": str(workers),
                "IMGPIPE_WORKER_THREADS": "1",
            }
            rates: list[float] = []
            meter = meters[workers] = CpuMeter()
            with running_stack(env) as stack:
                async with aiohttp.ClientSession() as http:
                    await process(http, stack, urls[:WARMUP_IMAGES], "warm", within=TIMEOUT)
                    for i in range(settings.runs):
                        with meter.measure(partial(measured, stack)):
                            _, seconds = await process(http, stack, urls, f"w{i}", within=TIMEOUT)
                        rates.append(count / seconds)
                        log(f"B6 {workers} workers run {i + 1}/{settings.runs}: {rates[-1]:.1f}/s")
            by_workers[workers] = rates
    med = {workers: median(rates) for workers, rates in by_workers.items()}
    first = min(med)
    per_worker = med[first] / first
    line_chart(
        png,
        f"imgpipe scaling: {count} photos of 1200x1200, {os.cpu_count()} cores",
        "worker processes",
        "images/s",
        sorted(med.items()),
        [(w, per_worker * w) for w in sorted(med)],
        f"linear from {first}",
    )
    rows = [
        (
            workers,
            ", ".join(f"{r:.1f}" for r in by_workers[workers]),
            f"{rate:.1f}",
            f"{rate / med[first]:.2f}×",
            f"{rate / (per_worker * workers):.0%}",
            f"{1000 * meters[workers].stack_seconds() / (count * settings.runs):.1f}",
            f"{meters[workers].others_share:.0%}",
        )
        for workers, rate in sorted(med.items())
    ]
    lines = [
        f"{count} photos of 1200×1200 per run, fresh stack per worker count, each worker at its"
        " default concurrency with one codec thread (a 1-CPU worker's default), on"
        f" {os.cpu_count()} cores. Stack CPU counts every"
        " service, Postgres and Redis; others' share is the machine's CPU used meanwhile by"
        " processes outside imgpipe and the bench.",
        "",
        *table(
            (
                "workers",
                "runs, images/s",
                "median images/s",
                "speed-up",
                "of linear",
                "stack CPU ms/image",
                "others' share of the CPU",
            ),
            rows,
        ),
        "",
        f"![scaling]({png.name})",
    ]
    return Section(
        "B6",
        "scaling",
        lines,
        {
            "images": count,
            "images_per_s": {str(w): r for w, r in by_workers.items()},
            "median": {str(w): r for w, r in med.items()},
            "chart": png.name,
        },
        [
            Target("B6", f"images/s with {w} worker{'s' if w > 1 else ''}", f"{r:.1f}", "—", None)
            for w, r in sorted(med.items())
        ],
    )
