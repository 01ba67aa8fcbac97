"""B1 codec efficiency and B2 latency hiding, measured side by side on one stack.

Each run does, in turn: the plain Pillow loop over the photos (B1), the pipeline over the same
photos from a prompt origin (B1, and B2's reference), the pipeline over them from an origin
that waits `origin_delay` per image (B2). Alternating them inside one run means a change in the
machine's load affects both sides of each ratio alike.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from functools import partial

import aiohttp

from bench.corpus import Corpus, PillowRun, pillow_loop
from bench.cpu import CpuMeter
from bench.pipeline import log, process, running_stack
from bench.procs import measured, peak_rss_mb
from bench.report import Section, Target, cpu_lines, median, table
from bench.settings import BenchSettings
from tests.origin import serve_images

TIMEOUT = 900.0  # the longest one pipeline run may take
WARMUP_IMAGES = 40


@dataclass(frozen=True, slots=True)
class B1Run:
    pillow: PillowRun
    pillow_others: float  # share of the machine's CPU used outside bench and stack meanwhile
    pipeline_s: float
    pipeline_cpu_s: float  # every stack process: services, Postgres, Redis
    pipeline_others: float


async def run(settings: BenchSettings, corpus: Corpus, names: tuple[str, ...]) -> list[Section]:
    count, cores = settings.images, os.cpu_count() or 1
    paths = corpus.ensure(count)
    async with (
        serve_images(corpus.size) as prompt,
        serve_images(corpus.size, delay=settings.origin_delay) as slow,
    ):
        fast_urls, slow_urls = corpus.serve(prompt, count), corpus.serve(slow, count)
        env = {
            "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{prompt.port},127.0.0.1:{slow.port}",
            "IMGPIPE_DEV_WORKERS": str(settings.workers),
        }
        b1: list[B1Run] = []
        fast: list[float] = []
        delayed: list[float] = []
        meter = CpuMeter()  # every measured pipeline run, for the breakdown
        with running_stack(env) as stack:
            groups = partial(measured, stack)
            async with aiohttp.ClientSession() as http:
                # Connections, pools, threads and imports warm up outside the measurement.
                await process(http, stack, fast_urls[:WARMUP_IMAGES], "warm", within=TIMEOUT)
                for i in range(settings.runs):
                    pillow_meter, run_meter = CpuMeter(), CpuMeter()
                    if "B1" in names:
                        with pillow_meter.measure(groups):
                            pillow = await asyncio.to_thread(pillow_loop, paths, cores)
                    with meter.measure(groups), run_meter.measure(groups):
                        _, seconds = await process(http, stack, fast_urls, f"f{i}", within=TIMEOUT)
                    fast.append(seconds)
                    if "B1" in names:
                        # The pool's processes are not in `groups`: take them out of "others".
                        others = pillow_meter.others_share - pillow.cpu_s / pillow_meter.machine
                        b1.append(
                            B1Run(
                                pillow,
                                others,
                                seconds,
                                run_meter.stack_seconds(),
                                run_meter.others_share,
                            )
                        )
                    if "B2" in names:
                        _, seconds = await process(http, stack, slow_urls, f"s{i}", within=TIMEOUT)
                        delayed.append(seconds)
                    log(_progress(i, settings.runs, count, b1, fast, delayed))
            peaks = peak_rss_mb(stack)
    sections = []
    if "B1" in names:
        sections.append(_b1(settings, cores, b1, meter, peaks))
    if "B2" in names:
        sections.append(_b2(settings, fast, delayed))
    return sections


def _progress(
    i: int, runs: int, count: int, b1: list[B1Run], fast: list[float], delayed: list[float]
) -> str:
    parts = [f"B1/B2 run {i + 1}/{runs}:"]
    if b1:
        parts.append(f"Pillow {b1[-1].pillow.images_per_s:.1f}/s,")
    parts.append(f"pipeline {count / fast[-1]:.1f}/s ({fast[-1]:.1f} s)")
    if delayed:
        parts.append(f", with origin delay {delayed[-1]:.1f} s")
    return " ".join(parts)


def _b1(
    settings: BenchSettings, cores: int, runs: list[B1Run], meter: CpuMeter, peaks: dict[str, float]
) -> Section:
    count = settings.images
    pillow = [r.pillow.images_per_s for r in runs]
    pipeline = [count / r.pipeline_s for r in runs]
    ratios = [p / b for p, b in zip(pipeline, pillow, strict=True)]
    pillow_ms = [r.pillow.cpu_ms_per_image for r in runs]
    pipeline_ms = [1000 * r.pipeline_cpu_s / count for r in runs]
    cpu_ratios = [b / p for b, p in zip(pillow_ms, pipeline_ms, strict=True)]
    ratio, cpu_ratio = median(ratios), median(cpu_ratios)
    rows: list[tuple[object, ...]] = [
        (
            i + 1,
            f"{r.pillow.images_per_s:.1f}",
            f"{p:.1f}",
            f"**{q:.2f}**",
            f"{r.pillow.cpu_ms_per_image:.1f}",
            f"{1000 * r.pipeline_cpu_s / count:.1f}",
            f"{c:.2f}",
            f"{r.pillow_others:.0%} / {r.pipeline_others:.0%}",
        )
        for i, (r, p, q, c) in enumerate(zip(runs, pipeline, ratios, cpu_ratios, strict=True))
    ]
    rows.append(
        (
            "**median**",
            f"{median(pillow):.1f}",
            f"{median(pipeline):.1f}",
            f"**{ratio:.2f}**",
            f"{median(pillow_ms):.1f}",
            f"{median(pipeline_ms):.1f}",
            f"{cpu_ratio:.2f}",
            "",
        )
    )
    lines = [
        f"{count} photos of 1200×1200 per run, {settings.workers} worker processes (default"
        " concurrency and threads). Plain Pillow loop: decode, convert RGB, JPEG quality 50"
        f" with optimize and progressive (the pipeline's defaults), in {cores} processes over"
        " the same files. Pipeline: POST /upload until the request is Completed (the server's"
        " completed_at), every image through gateway, ingest, Redis, a worker, storage and"
        " Postgres. The two alternate within each run; ratio per run, then the median.",
        "",
        "CPU per image counts every process of each side (the pipeline: all services, Postgres"
        " and Redis; not the bench's origin); its ratio (Pillow ÷ pipeline) does not depend on"
        ' what else the machine runs. "Others" is the share of the machine\'s CPU that'
        " processes outside imgpipe and the bench used meanwhile (other people's work).",
        "",
        *table(
            (
                "run",
                "Pillow loop, images/s",
                "pipeline, images/s",
                "B1 ratio",
                "Pillow CPU ms/image",
                "pipeline CPU ms/image",
                "CPU ratio",
                "others during Pillow / pipeline",
            ),
            rows,
        ),
        "",
        *cpu_lines(meter.table(), meter.wall, f"the {settings.runs} measured pipeline runs"),
        "Peak RSS (VmHWM) after the runs, MB: "
        + ", ".join(f"{name} {mb:.0f}" for name, mb in sorted(peaks.items())),
    ]
    return Section(
        "B1",
        "codec efficiency",
        lines,
        {
            "images": count,
            "workers": settings.workers,
            "pillow_processes": cores,
            "pillow_images_per_s": pillow,
            "pipeline_images_per_s": pipeline,
            "ratios": ratios,
            "median_ratio": ratio,
            "pillow_cpu_ms_per_image": pillow_ms,
            "pipeline_cpu_ms_per_image": pipeline_ms,
            "median_cpu_ratio": cpu_ratio,
            "others_share_pillow": [r.pillow_others for r in runs],
            "others_share_pipeline": [r.pipeline_others for r in runs],
            "cpu": meter.table(),
            "cpu_wall_s": meter.wall,
            "peak_rss_mb": peaks,
        },
        [
            Target(
                "B1", "pipeline / Pillow loop, images/s", f"{ratio:.2f}", "≥ 0.85", ratio >= 0.85
            ),
            Target("B1", "pipeline images/s", f"{median(pipeline):.1f}", "—", None),
            Target("B1", "CPU per image, Pillow / pipeline", f"{cpu_ratio:.2f}", "—", None),
        ],
    )


def _b2(settings: BenchSettings, fast: list[float], delayed: list[float]) -> Section:
    ratios = [d / f for d, f in zip(delayed, fast, strict=True)]
    ratio = median(ratios)
    rows: list[tuple[object, ...]] = [
        (i + 1, f"{f:.1f}", f"{d:.1f}", f"{r:.2f}")
        for i, (f, d, r) in enumerate(zip(fast, delayed, ratios, strict=True))
    ]
    rows.append(("**median**", f"{median(fast):.1f}", f"{median(delayed):.1f}", f"{ratio:.2f}"))
    delay_ms = settings.origin_delay * 1000
    lines = [
        f"The B1 upload ({settings.images} photos, {settings.workers} workers) with the origin"
        f" waiting {delay_ms:.0f} ms before each image, against the same upload from a prompt"
        " origin in the same run.",
        "",
        *table(("run", "B1 time, s", "B2 time, s", "B2 / B1"), rows),
    ]
    return Section(
        "B2",
        "latency hiding",
        lines,
        {
            "origin_delay_s": settings.origin_delay,
            "b1_seconds": fast,
            "b2_seconds": delayed,
            "ratios": ratios,
            "median_ratio": ratio,
        },
        [
            Target(
                "B2",
                f"time with {delay_ms:.0f} ms origin / B1 time",
                f"{ratio:.2f}",
                "≤ 1.3",
                ratio <= 1.3,
            )
        ],
    )
