"""B5 worker memory: peak RSS of one worker compressing 24-megapixel JPEGs.

A fresh stack per run with one worker at its default concurrency and thread count, so the
worker's VmHWM (a lifetime peak) is the peak of start-up plus this one request.
"""

from __future__ import annotations

import aiohttp

from bench.corpus import Corpus
from bench.pipeline import log, process, running_stack
from bench.procs import memory_mb, stack_processes
from bench.report import Section, Target, median, table
from bench.settings import BenchSettings
from services.worker.budget import DEFAULT_BUFFER_BYTES, DEFAULT_PIXEL_BUDGET
from testing.origin import serve_images
from testing.stack import Stack

TARGET_MB = 400.0


async def run(settings: BenchSettings, corpus: Corpus) -> Section:
    peaks: list[float] = []
    idle: list[float] = []
    seconds: list[float] = []
    count = settings.big_images
    async with serve_images(corpus.size) as origin:
        urls = corpus.serve(origin, count)
        env = {"IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}", "IMGPIPE_DEV_WORKERS": "1"}
        for i in range(settings.runs):
            with running_stack(env) as stack:
                idle.append(_worker_peak(stack))
                async with aiohttp.ClientSession() as http:
                    _, took = await process(http, stack, urls, f"m{i}", within=600)
                seconds.append(took)
                peaks.append(_worker_peak(stack))
            log(f"B5 run {i + 1}/{settings.runs}: worker peak {peaks[-1]:.0f} MB in {took:.1f} s")
    peak = median(peaks)
    width, height = corpus.size
    lines = [
        f"{count} photos of {width}×{height} ({width * height / 1e6:.0f} megapixels, about"
        f" {median([p.stat().st_size for p in corpus.paths[:count]]) / 1e6:.1f} MB each as"
        " JPEG q95) in one request, one worker at its defaults: 32 tasks in flight, one"
        f" thread per core, a {DEFAULT_BUFFER_BYTES >> 20} MiB download buffer and a"
        f" {DEFAULT_PIXEL_BUDGET / 1e6:.0f} MP pixel budget; VmHWM of the worker process, on a"
        " fresh stack per run.",
        "",
        *table(
            ("run", "worker idle MB", "worker peak MB", "time, s", "images/s"),
            [
                (i + 1, f"{a:.0f}", f"{p:.0f}", f"{s:.1f}", f"{count / s:.2f}")
                for i, (a, p, s) in enumerate(zip(idle, peaks, seconds, strict=True))
            ],
        ),
    ]
    return Section(
        "B5",
        "worker memory",
        lines,
        {
            "images": count,
            "size": f"{width}x{height}",
            "idle_mb": idle,
            "peak_mb": peaks,
            "seconds": seconds,
            "median_peak_mb": peak,
        },
        [
            Target(
                "B5",
                "worker peak RSS, 24 MP JPEGs",
                f"{peak:.0f} MB (max {max(peaks):.0f})",
                f"≤ {TARGET_MB:.0f} MB",
                peak <= TARGET_MB,
            ),
        ],
    )


def _worker_peak(stack: Stack) -> float:
    return memory_mb(stack_processes(stack)["worker-1"][0]) or float("nan")
