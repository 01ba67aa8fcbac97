"""B1 codec efficiency and B2 latency hiding, measured side by side on one stack.

Each run does, in turn: the plain Pillow loop over the photos (B1), the pipeline over the same
photos from a prompt origin (B1, and B2's reference), the pipeline over them from an origin
that waits `origin_delay` per image (B2). Alternating them inside one run means a change in the
machine's load affects both sides of each ratio alike.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import aiohttp

from bench.corpus import Corpus, PillowRun, pillow_loop, same_work
from bench.cpu import CpuMeter
from bench.pipeline import log, output_bytes, process, running_stack
from bench.procs import Groups, measured, peak_rss_mb
from bench.report import Section, Target, cpu_lines, median, table
from bench.settings import BenchSettings
from services.common.image_options import Effort
from services.worker.budget import return_big_images_to_the_os
from services.worker.encoders import encoder_settings
from testing.origin import serve_images
from testing.stack import Stack

TIMEOUT = 900.0  # the longest one pipeline run may take
WARMUP_IMAGES = 40


# The efforts B1 measures: every JPEG encoder setting of services/worker/encoders.py once
# (max is balanced for JPEG; it is reported as such, not run twice).
EFFORTS = tuple(dict.fromkeys(Effort, None))
HALF = "balanced, scale=0.5"


@dataclass(frozen=True, slots=True)
class Side:
    images_per_s: float
    cpu_ms: float  # per image, every process of this side
    kib: float  # average output
    # per image, the worker processes alone (codec and their plumbing); a loop's is its cpu_ms
    worker_cpu_ms: float = 0.0
    # a loop's minor page faults and system CPU per image (not measured for the pipeline)
    faults: float = 0.0
    system_ms: float = 0.0


@dataclass
class B1Run:
    plain: Side  # Pillow loop with Pillow's defaults at quality 50
    # Pillow loop with an effort's settings, measuring SSIM where the pipeline does (same work)
    same: dict[str, Side] = field(default_factory=dict)  # by effort, and HALF
    pipeline: dict[str, Side] = field(default_factory=dict)  # by effort, and HALF
    others: float = 0.0  # share of the machine's CPU used outside bench and stack
    idle: float = 0.0  # share of the cores' time no process used


def _effort_figures(runs: list[B1Run], effort: str) -> dict[str, float]:
    """Medians over the runs of one effort's figures."""
    pipeline = [r.pipeline[effort] for r in runs]
    return {
        "pipeline_images_per_s": median([p.images_per_s for p in pipeline]),
        "pipeline_cpu_ms": median([p.cpu_ms for p in pipeline]),
        "pipeline_kib": median([p.kib for p in pipeline]),
        "same_loop_images_per_s": median([r.same[effort].images_per_s for r in runs]),
        "plumbing": median(
            [r.pipeline[effort].images_per_s / r.same[effort].images_per_s for r in runs]
        ),
        "vs_plain": median([r.pipeline[effort].images_per_s / r.plain.images_per_s for r in runs]),
        "bytes_vs_plain": median([r.pipeline[effort].kib / r.plain.kib for r in runs]),
        # What a core running only a worker does, against one running the loops: the
        # services, Postgres and the origin live on other nodes in a deployment.
        "worker_cpu_ms": median([p.worker_cpu_ms for p in pipeline]),
        "worker_only_plumbing": median(
            [r.same[effort].cpu_ms / r.pipeline[effort].worker_cpu_ms for r in runs]
        ),
        "worker_only_vs_plain": median(
            [r.plain.cpu_ms / r.pipeline[effort].worker_cpu_ms for r in runs]
        ),
    }


def _distinct_efforts() -> list[Effort]:
    seen: dict[tuple[tuple[str, object], ...], Effort] = {}
    for effort in Effort:
        seen.setdefault(tuple(sorted(encoder_settings("jpeg", effort).items())), effort)
    return list(seen.values())


def _loop_side(run: PillowRun, count: int) -> Side:
    cpu_ms = run.cpu_ms_per_image
    kib = run.output_bytes / count / 1024
    return Side(
        run.images_per_s, cpu_ms, kib, cpu_ms, run.faults_per_image, run.system_ms_per_image
    )


async def run(settings: BenchSettings, corpus: Corpus, names: tuple[str, ...]) -> list[Section]:
    count, cores = settings.images, os.cpu_count() or 1
    paths = corpus.ensure(count)
    efforts = _distinct_efforts()
    # Each side of B1 beside the plain loop: its name, the work of its same-work loop, and its
    # pipeline's query and serial-number tag.
    sides: list[tuple[str, Callable[[str], int], dict[str, str], str]] = [
        (
            effort,
            partial(same_work, effort, effort is not Effort.FAST),
            {"effort": effort.value},
            effort.value,
        )
        for effort in efforts
    ]
    half_work = partial(same_work, Effort.BALANCED, True, scale=0.5)
    sides.append((HALF, half_work, {"scale": "0.5"}, "half"))
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
                    machine_meter = CpuMeter()
                    with machine_meter.measure(groups):
                        if "B1" in names:
                            plain = await asyncio.to_thread(pillow_loop, paths, cores)
                            current = B1Run(_loop_side(plain, count))
                            for key, work, query, tag in sides:
                                loop = await asyncio.to_thread(
                                    partial(
                                        pillow_loop,
                                        paths,
                                        cores,
                                        work,
                                        setup=return_big_images_to_the_os,
                                    )
                                )
                                current.same[key] = _loop_side(loop, count)
                                current.pipeline[key] = await _pipeline(
                                    http, stack, groups, meter, fast_urls, f"{tag}{i}", query
                                )
                            b1.append(current)
                        if b1:  # B2's reference: the balanced run just measured
                            fast.append(count / b1[-1].pipeline[Effort.BALANCED].images_per_s)
                        else:
                            fast.append(await _seconds(http, stack, fast_urls, f"f{i}"))
                        if "B2" in names:
                            delayed.append(await _seconds(http, stack, slow_urls, f"s{i}"))
                    if b1:
                        b1[-1].others = machine_meter.others_share
                        b1[-1].idle = machine_meter.idle_share(cores)
                    log(_progress(i, settings.runs, count, b1, fast, delayed))
            peaks = peak_rss_mb(stack)
    sections = []
    if "B1" in names:
        sections.append(_b1(settings, cores, efforts, b1, meter, peaks))
    if "B2" in names:
        sections.append(_b2(settings, fast, delayed))
    return sections


async def _pipeline(
    http: aiohttp.ClientSession,
    stack: Stack,
    groups: Callable[[], Groups],
    meter: CpuMeter,
    urls: list[str],
    tag: str,
    options: dict[str, str],
) -> Side:
    run_meter = CpuMeter()
    with meter.measure(groups), run_meter.measure(groups):
        request_id, seconds = await process(http, stack, urls, tag, within=TIMEOUT, query=options)
    total = await output_bytes(http, stack, request_id)
    count = len(urls)
    workers = sum(used for name, used in run_meter.seconds.items() if name.startswith("worker"))
    return Side(
        count / seconds,
        1000 * run_meter.stack_seconds() / count,
        total / count / 1024,
        1000 * workers / count,
    )


async def _seconds(http: aiohttp.ClientSession, stack: Stack, urls: list[str], tag: str) -> float:
    return (await process(http, stack, urls, tag, within=TIMEOUT))[1]


def _progress(
    i: int, runs: int, count: int, b1: list[B1Run], fast: list[float], delayed: list[float]
) -> str:
    parts = [f"B1/B2 run {i + 1}/{runs}:"]
    if b1:
        last = b1[-1]
        parts.append(f"plain Pillow {last.plain.images_per_s:.1f}/s,")
        parts += [f"{name} {side.images_per_s:.1f}/s," for name, side in last.pipeline.items()]
    parts.append(f"pipeline {count / fast[-1]:.1f}/s ({fast[-1]:.1f} s)")
    if delayed:
        parts.append(f", with origin delay {delayed[-1]:.1f} s")
    return " ".join(parts)


def _b1(
    settings: BenchSettings,
    cores: int,
    efforts: list[Effort],
    runs: list[B1Run],
    meter: CpuMeter,
    peaks: dict[str, float],
) -> Section:
    def med(values: Callable[[B1Run], float]) -> float:
        return median([values(r) for r in runs])

    rows: list[tuple[object, ...]] = [
        (
            "plain Pillow loop (quality=50)",
            f"{med(lambda r: r.plain.images_per_s):.1f}",
            f"{med(lambda r: r.plain.cpu_ms):.1f}",
            f"{med(lambda r: r.plain.kib):.1f}",
            "",
            "1.00",
            "1.00",
        ),
    ]
    figures: dict[str, dict[str, float]] = {}
    targets: list[Target] = []
    for effort in efforts:
        f = figures[effort.value] = _effort_figures(runs, effort)
        also = " (= max)" if effort is Effort.BALANCED and Effort.MAX not in efforts else ""
        rows.append(
            (
                f"pipeline, effort={effort.value}{also}",
                f"{f['pipeline_images_per_s']:.1f}",
                f"{f['pipeline_cpu_ms']:.1f}",
                f"{f['pipeline_kib']:.1f}",
                f"**{f['plumbing']:.2f}** (loop {f['same_loop_images_per_s']:.1f}/s)",
                f"**{f['vs_plain']:.2f}**",
                f"**{f['bytes_vs_plain']:.2f}**",
            )
        )
        targets.append(
            Target(
                "B1",
                f"{effort.value}: plumbing (pipeline / same-work loop)",
                f"{f['plumbing']:.2f}",
                "≥ 0.95",
                f["plumbing"] >= 0.95,
            )
        )
    half = med(lambda r: r.pipeline[HALF].images_per_s / r.pipeline[Effort.BALANCED].images_per_s)
    # What the codec alone gains at half size: the ceiling of the pipeline's ratio.
    half_loop = med(lambda r: r.same[HALF].images_per_s / r.same[Effort.BALANCED].images_per_s)
    half_plumbing = med(lambda r: r.pipeline[HALF].images_per_s / r.same[HALF].images_per_s)
    rows.append(
        (
            f"pipeline, {HALF}",
            f"{med(lambda r: r.pipeline[HALF].images_per_s):.1f}",
            f"{med(lambda r: r.pipeline[HALF].cpu_ms):.1f}",
            f"{med(lambda r: r.pipeline[HALF].kib):.1f}",
            f"{half_plumbing:.2f} (loop {med(lambda r: r.same[HALF].images_per_s):.1f}/s)",
            f"{med(lambda r: r.pipeline[HALF].images_per_s / r.plain.images_per_s):.2f}",
            "",
        )
    )
    fast_ratio = figures[Effort.FAST.value]["vs_plain"]
    balanced = figures[Effort.BALANCED.value]
    targets += [
        Target(
            "B1", "fast / plain Pillow, images/s", f"{fast_ratio:.2f}", "≥ 0.90", fast_ratio >= 0.90
        ),
        Target(
            "B1",
            "balanced / plain Pillow, images/s",
            f"{balanced['vs_plain']:.2f}",
            "≥ 0.68 (1.3 × 0.52)",
            balanced["vs_plain"] >= 0.68,
        ),
        Target(
            "B1",
            "balanced bytes / plain Pillow bytes",
            f"{balanced['bytes_vs_plain']:.2f}",
            "< 1",
            balanced["bytes_vs_plain"] < 1,
        ),
        Target("B1", "scale=0.5 / full size, images/s", f"{half:.2f}", "≥ 2", half >= 2),
        Target(
            "B1",
            "scale=0.5 / full size, the same-work loops alone (the codec's own gain)",
            f"{half_loop:.2f}",
            "—",
            None,
        ),
    ]
    lines = [
        f"{settings.images} real photographs (testing/photos.py) of 1200×1200 per run, q90"
        f" sources; {settings.workers} worker processes (default concurrency and threads)."
        f" Loops run in {cores} fresh interpreters over the same files. The plain loop is what"
        " anyone would write first: decode, convert RGB, JPEG quality 50 with Pillow's"
        " defaults. A same-work loop per effort does the worker's codec work without its"
        " services: decode, the worker's `tuning.encode` at that effort (no RGB copy of an RGB"
        " photo, as in the worker), and where the pipeline measures SSIM (every effort but"
        " fast) the same measurement, in processes with the worker's malloc thresholds."
        " Pipeline: POST /upload until Completed, every image through gateway, ingest, Redis,"
        " a worker, storage and Postgres. Everything alternates within each run; ratios per"
        f" run, then the median of {len(runs)} runs.",
        "",
        "Plumbing = pipeline ÷ the loop doing the same codec work (what the services cost);"
        " vs plain = pipeline ÷ the plain loop (what the settings cost too); bytes = average"
        " output ÷ the plain loop's.",
        "",
        f"scale=0.5 ÷ full size, images/s: the pipeline {half:.2f}×, the same-work loops"
        f" {half_loop:.2f}× (balanced, shrink-on-load at 1/2). The loops' ratio is what the"
        " codec alone gains, the ceiling of the pipeline's: the source's entropy decoding is"
        " paid in full at any scale, and the services' cost per image does not shrink.",
        "",
        "Worker only = the loop's CPU per image ÷ the worker processes' CPU per image (codec and"
        " their own plumbing, without gateway, ingest, status, Postgres, Redis and the origin):"
        " what a core that runs only a worker delivers, as on a worker node of a deployment."
        " Informational; the targets are on the whole stack.",
        "",
        *table(
            (
                "side",
                "images/s",
                "CPU ms/image",
                "average KiB",
                "plumbing",
                "vs plain",
                "bytes vs plain",
            ),
            rows,
        ),
        "",
        *table(
            ("effort", "worker CPU ms/image", "worker only ÷ same-work loop", "÷ plain loop"),
            [
                (
                    name,
                    f"{f['worker_cpu_ms']:.1f}",
                    f"{f['worker_only_plumbing']:.2f}",
                    f"{f['worker_only_vs_plain']:.2f}",
                )
                for name, f in figures.items()
            ],
        ),
        "",
        "Page faults per photo in the loops (fresh pages the kernel maps and zeroes), with the"
        " system CPU they cost: "
        + ", ".join(
            [_faults("plain", [r.plain for r in runs])]
            + [_faults(f"same-work {e.value}", [r.same[e] for r in runs]) for e in efforts]
        )
        + '. The plain loop\'s `convert("RGB")` copies the photo: with two 5.5 MiB images'
        " alive, glibc's heap top passes its trim threshold and goes back to the kernel after"
        ' every photo, to be faulted in again for the next (docs/performance.md, "The plain'
        " loop's two speeds\").",
        "",
        "Others (CPU of processes outside imgpipe and the bench) per run: "
        + ", ".join(f"{r.others:.0%}" for r in runs)
        + f". Idle (the {cores} cores' time that no process used) per run: "
        + ", ".join(f"{r.idle:.0%}" for r in runs)
        + ": the loops and pipelines keep every core busy, so a run with much idle time had"
        " a machine that stalled (on I/O, or on its neighbours) and its figures do not"
        " compare.",
        "",
        *cpu_lines(meter.table(), meter.wall, "the measured pipeline runs"),
        "Peak RSS (VmHWM) after the runs, MB: "
        + ", ".join(f"{name} {mb:.0f}" for name, mb in sorted(peaks.items())),
    ]
    return Section(
        "B1",
        "codec efficiency",
        lines,
        {
            "images": settings.images,
            "workers": settings.workers,
            "pillow_processes": cores,
            "efforts": figures,
            "scale_half_vs_full": half,
            "scale_half_vs_full_loop": half_loop,
            "scale_half_plumbing": half_plumbing,
            "plain_images_per_s": [r.plain.images_per_s for r in runs],
            "plain_kib": [r.plain.kib for r in runs],
            "plain_faults_per_image": [r.plain.faults for r in runs],
            "plain_system_ms_per_image": [r.plain.system_ms for r in runs],
            "same_work_faults_per_image": {
                e.value: [r.same[e].faults for r in runs] for e in efforts
            },
            "others_share": [r.others for r in runs],
            "idle_share": [r.idle for r in runs],
            "cpu": meter.table(),
            "cpu_wall_s": meter.wall,
            "peak_rss_mb": peaks,
        },
        targets,
    )


def _faults(name: str, sides: list[Side]) -> str:
    """ "fast 0 (0.1 ms)": a loop's median page faults and system CPU per photo, and what one
    fault cost where there were enough to tell."""
    faults, system_ms = median([s.faults for s in sides]), median([s.system_ms for s in sides])
    each = f", {1000 * system_ms / faults:.1f} µs each" if faults >= 100 else ""
    return f"{name} {faults:.0f} ({system_ms:.1f} ms{each})"


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
