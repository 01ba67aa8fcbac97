"""B8 head of line, B9 two owners, B13 a slow owner, B14 a waiting one and B16 a heavy one:
fair scheduling (docs/scheduling.md) on the real stack.

Both serve one small generated photo under many paths from 127.0.0.1, with origin latency
(IMGPIPE_BENCH_HOL_DELAY, IMGPIPE_BENCH_FAIR_DELAY), and every URL is distinct.

B8: a small request alone (its solo time, median of the runs), then a big request alone (its
images/s), then the big request again with a small one sent into it once per run: each small
request's time from its POST to its completion, and the big request's images/s.

B9: two owners (two API keys), each uploading one request, the second after a head start;
every half second both requests' progress is read, and while both run each one's share of the
images that became final is its share of the workers. Once with equal weights, once 3:1.

B13: one owner's request from an origin that takes IMGPIPE_BENCH_SLOW_DELAY per image, then,
once its tasks hold the workers, another owner's prompt request: that one's time from its POST
to its completion, against the same request alone. A task is not preempted, but a worker's 16
connections to one origin serve its slots in rounds, and a task that waits for one
longer than IMGPIPE_FETCH_CONNECTION_WAIT (1 s) gives its slot back: the prompt one waits about
that long for slots (until 2026-12-07, up to two of the slow images' times).

B14: as B13, but the first owner's origin answers each image's first request 503 with
`Retry-After: IMGPIPE_BENCH_RETRY_AFTER`: its images wait for their next attempt, and for the
origin's cooldown, with their slots given back (docs/scheduling.md).

B16: as B13, but the first owner's IMGPIPE_BENCH_HEAVY_IMAGES photos are of 24 megapixels,
from a prompt origin: its tasks queue for the workers' compress threads with the prompt ones.

B17: one owner's IMGPIPE_BENCH_BUSY_IMAGES images from an origin that takes
IMGPIPE_BENCH_BUSY_DELAY per image, alone: more tasks than the workers have connections to
it, so tasks wait for one. Their images/s when they give their slots back after
IMGPIPE_FETCH_CONNECTION_WAIT (the default) against waiting in them (the setting at an hour),
on a new stack each, alternating; and how often a task gave its slot back (the workers'
imgpipe_images_deferred_total{reason="busy"}).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import aiohttp

from bench.pipeline import csv_bytes, log, running_stack, upload, wait_final, worker_concurrency
from bench.report import Section, Target, median, table
from bench.settings import BenchSettings
from services.common.auth import key_hash, new_key
from services.local.launcher import metrics_ports
from testing.origin import ImageOrigin, serve_images
from testing.ports import free_port_block
from testing.stack import Stack

SIZE = (400, 300)
SOLO_SLACK = 2.0  # B8: a small request's time with the big one running, at most solo + this
BIG_DROP = 0.10  # B8: the big request's images/s drops by at most this share
SHARE_SLACK = 0.10  # B9: each owner's share within this of its weight's
SAMPLE_SECONDS = 0.5
SETTLE_SECONDS = 2.0  # B9: the shares are counted from this long after the second upload


def _urls(origin: ImageOrigin, count: int, tag: str) -> list[str]:
    """`count` distinct URLs that all serve the same photo (made once)."""
    photo = origin.image("/img/one.jpg")
    paths = [f"/img/{tag}-{i}.jpg" for i in range(count)]
    for path in paths:
        origin.served[path] = photo
    return [origin.url(path) for path in paths]


def _stack_env(settings: BenchSettings, origin: ImageOrigin, **extra: str) -> dict[str, str]:
    return {
        "IMGPIPE_DEV_WORKERS": str(settings.workers),
        "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}",
        **extra,
    }


def _server_seconds(status: dict[str, Any]) -> float:
    created = datetime.fromisoformat(str(status["created_at"]))
    completed = datetime.fromisoformat(str(status["completed_at"]))
    return (completed - created).total_seconds()


async def _finished(
    http: aiohttp.ClientSession, stack: Stack, urls: list[str], tag: str, within: float
) -> tuple[float, float]:
    """Upload and wait: (seconds from the POST to completion, the server's images/s)."""
    accepted = await upload(http, stack, csv_bytes(urls, 10, tag))
    status = await wait_final(http, stack, accepted.request_id, within)
    if status["status"] != "Completed":
        raise RuntimeError(f"{tag} ended {status['status']}: {status['progress']}")
    completed = datetime.fromisoformat(str(status["completed_at"])).timestamp()
    return completed - accepted.started_at, len(urls) / _server_seconds(status)


async def run_b8(settings: BenchSettings) -> Section:
    big_n, small_n = settings.hol_big, settings.hol_small
    async with serve_images(SIZE, delay=settings.hol_delay) as origin:
        with running_stack(_stack_env(settings, origin)) as stack:
            timeout = aiohttp.ClientTimeout(total=1800)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                solo = []
                for i in range(settings.runs):
                    seconds, _ = await _finished(
                        http, stack, _urls(origin, small_n, f"s{i}"), f"s{i}", 120
                    )
                    solo.append(seconds)
                log(f"B8 small request alone: {[f'{s:.2f}' for s in solo]} s")
                _, big_alone = await _finished(
                    http, stack, _urls(origin, big_n, "big-alone"), "big-alone", 3600
                )
                log(f"B8 big request alone: {big_alone:.1f} images/s")
                during, big_shared = await _big_with_small_ones(http, stack, origin, settings)
    solo_med, during_med = median(solo), median(during)
    drop = 1 - big_shared / big_alone
    targets = [
        Target(
            "B8",
            f"{small_n}-image request during a {big_n:,}-image one (median of {len(during)})",
            f"{during_med:.2f} s (solo {solo_med:.2f} s)",
            f"≤ solo + {SOLO_SLACK:g} s",
            during_med <= solo_med + SOLO_SLACK,
        ),
        Target(
            "B8",
            "big request's images/s with the small ones",
            f"{big_shared:.1f} vs {big_alone:.1f} alone ({-drop:+.1%})",
            f"drop ≤ {BIG_DROP:.0%}",
            drop <= BIG_DROP,
        ),
    ]
    lines = [
        f"{settings.workers} workers, the default window (IMGPIPE_SCHEDULER_WINDOW), photos of"
        f" {SIZE[0]}×{SIZE[1]} with {settings.hol_delay:g} s of origin latency. Times are from"
        " the POST to the server's completed_at; images/s are the server's (images over"
        " completed_at - created_at).",
        "",
        *table(
            ("run", f"{small_n} images alone, s", f"{small_n} images during the big one, s"),
            [
                (i + 1, f"{a:.2f}", f"{b:.2f}")
                for i, (a, b) in enumerate(zip(solo, during, strict=False))
            ],
        ),
        "",
        f"Big request ({big_n:,} images): {big_alone:.1f} images/s alone,"
        f" {big_shared:.1f} images/s with the small requests.",
    ]
    data = {
        "solo_s": solo,
        "during_s": during,
        "big_alone_ips": big_alone,
        "big_shared_ips": big_shared,
        "big_images": big_n,
        "small_images": small_n,
    }
    return Section("B8", "head of line", lines, data, targets)


async def _big_with_small_ones(
    http: aiohttp.ClientSession, stack: Stack, origin: ImageOrigin, settings: BenchSettings
) -> tuple[list[float], float]:
    big_urls = _urls(origin, settings.hol_big, "big-shared")
    big = await upload(http, stack, csv_bytes(big_urls, 10, "big-shared"))
    during = []
    for i in range(settings.runs):
        await asyncio.sleep(3.0)  # pacing: the small requests arrive into a running big one
        seconds, _ = await _finished(
            http, stack, _urls(origin, settings.hol_small, f"d{i}"), f"d{i}", 120
        )
        during.append(seconds)
        log(f"B8 small request during the big one: {seconds:.2f} s")
    status = await wait_final(http, stack, big.request_id, 3600)
    return during, len(big_urls) / _server_seconds(status)


async def run_b9(settings: BenchSettings) -> Section:
    rows, targets = [], []
    data: dict[str, object] = {}
    for weights in ((1, 1), (3, 1)):
        share, overlap, samples = await _two_owners(settings, weights)
        expected = weights[0] / sum(weights)
        rows.append(
            (
                f"{weights[0]}:{weights[1]}",
                f"{share:.1%}",
                f"{expected:.0%}",
                f"{overlap:.1f}",
                samples,
            )
        )
        targets.append(
            Target(
                "B9",
                f"first owner's share of images/s, weights {weights[0]}:{weights[1]}",
                f"{share:.1%}",
                f"{expected:.0%} ± {SHARE_SLACK:.0%}",
                abs(share - expected) <= SHARE_SLACK,
            )
        )
        data[f"{weights[0]}:{weights[1]}"] = {
            "share": share,
            "overlap_s": overlap,
            "samples": samples,
        }
    lines = [
        f"Two API keys, one {settings.fair_images:,}-image request each, the second"
        f" {settings.fair_head_start:g} s after the first; {settings.workers} workers, photos of"
        f" {SIZE[0]}×{SIZE[1]} with {settings.fair_delay:g} s of origin latency. Shares count"
        f" the images that became final from {SETTLE_SECONDS:g} s after the second upload until"
        " either request completed, read every half second.",
        "",
        *table(("weights", "first owner's share", "expected", "both running, s", "samples"), rows),
    ]
    return Section("B9", "two owners", lines, data, targets)


async def _two_owners(
    settings: BenchSettings, weights: tuple[int, int]
) -> tuple[float, float, int]:
    first, second = new_key(), new_key()
    keys = (
        f"acme:{key_hash(first)} weight={weights[0]}, globex:{key_hash(second)} weight={weights[1]}"
    )
    n = settings.fair_images
    async with serve_images(SIZE, delay=settings.fair_delay) as origin:
        with running_stack(_stack_env(settings, origin, IMGPIPE_API_KEYS=keys)) as stack:
            timeout = aiohttp.ClientTimeout(total=1800)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                a = await upload(
                    http, stack, csv_bytes(_urls(origin, n, "a"), 10, "a"), api_key=first
                )
                await asyncio.sleep(settings.fair_head_start)  # the second owner's head start
                b = await upload(
                    http, stack, csv_bytes(_urls(origin, n, "b"), 10, "b"), api_key=second
                )
                settle = time.monotonic() + SETTLE_SECONDS
                samples = []
                while True:
                    progress = [
                        await _progress(http, stack, a.request_id, first),
                        await _progress(http, stack, b.request_id, second),
                    ]
                    if any(done >= n for done in progress):
                        break
                    if time.monotonic() >= settle:
                        samples.append((time.monotonic(), *progress))
                    await asyncio.sleep(SAMPLE_SECONDS)  # the client's polling interval
    if len(samples) < 2:
        raise RuntimeError(f"the two requests ran together too briefly: {samples}")
    (t0, a0, b0), (t1, a1, b1) = samples[0], samples[-1]
    share = (a1 - a0) / max(1, (a1 - a0) + (b1 - b0))
    log(f"B9 weights {weights}: share {share:.1%} over {t1 - t0:.1f} s")
    return share, t1 - t0, len(samples)


async def _progress(http: aiohttp.ClientSession, stack: Stack, request_id: str, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.get(f"{stack.base_url}/status/{request_id}?page_size=1", headers=headers) as r:
        status: dict[str, Any] = await r.json()
    progress = status.get("progress") or {}
    return int(progress.get("images_done", 0)) + int(progress.get("images_failed", 0))


SLOW_HEAD_START = 2.0  # B13: seconds between the slow owner's upload and the prompt one's
SLOW_SLACK = 2.0  # B13: the prompt request's time beyond alone (a connection wait and a second)


async def run_b13(settings: BenchSettings) -> Section:
    delay = settings.slow_delay
    alone, during = await _prompt_runs(settings, "B13", delay=delay)
    return _prompt_section(
        settings,
        ("B13", "a slow owner"),
        f"{settings.slow_images} take {delay:g} s each",
        (SLOW_SLACK, f"{SLOW_SLACK:g} s"),
        (alone, during),
        f"sends {settings.slow_images} images from an origin that answers each after"
        f" {delay:g} s; the second, {SLOW_HEAD_START:g} s later, {settings.prompt_images} from a"
        " prompt origin. Times are from the second POST until the client sees it Completed"
        " (polled every 50 ms); alone is the same request on the same stack before the slow"
        " one.",
        {"slow_delay_s": delay},
    )


WAIT_SLACK = 2.0  # B14: the prompt request's time beyond alone


async def run_b14(settings: BenchSettings) -> Section:
    wait = settings.retry_after
    alone, during = await _prompt_runs(settings, "B14", unavailable=wait)
    return _prompt_section(
        settings,
        ("B14", "an owner whose origin asks to wait"),
        f"{settings.slow_images} wait for their origin's Retry-After of {wait} s",
        (WAIT_SLACK, f"{WAIT_SLACK:g} s"),
        (alone, during),
        f"sends {settings.slow_images} images from an origin that answers each image's first"
        f" request 503 with `Retry-After: {wait}`; the second, {SLOW_HEAD_START:g} s later,"
        f" {settings.prompt_images} from a prompt origin. Times as in B13.",
        {"retry_after_s": wait},
    )


HEAVY_SIZE = (6000, 4000)  # B16: 24-megapixel photos, about 0.4 s of codec each
HEAVY_SLACK = 3.0  # B16: the prompt request's time beyond alone


async def run_b16(settings: BenchSettings) -> Section:
    count = settings.heavy_images
    photos = f"{count} photos of {HEAVY_SIZE[0]}×{HEAVY_SIZE[1]}"
    alone, during = await _prompt_runs(settings, "B16", size=HEAVY_SIZE, count=count)
    return _prompt_section(
        settings,
        ("B16", "an owner of heavy images"),
        f"{photos} are compressed",
        (HEAVY_SLACK, f"{HEAVY_SLACK:g} s"),
        (alone, during),
        f"sends {photos} from a prompt origin; the second, {SLOW_HEAD_START:g} s later,"
        f" {settings.prompt_images} of {SIZE[0]}×{SIZE[1]}. Times as in B13.",
        {"heavy_images": count},
    )


def _prompt_section(
    settings: BenchSettings,
    name: tuple[str, str],
    beside: str,
    slack: tuple[float, str],
    times: tuple[list[float], list[float]],
    setup: str,
    data: dict[str, object],
) -> Section:
    """B13, B14, B16: the prompt request's time beside the other owner's `beside`, against
    alone + `slack`; `setup` says what the first owner sends, and how."""
    alone, during = times
    target = Target(
        name[0],
        f"{settings.prompt_images} prompt images while another owner's {beside}"
        f" (median of {len(during)})",
        f"{median(during):.2f} s (alone {median(alone):.2f} s)",
        f"≤ alone + {slack[1]}",
        median(during) <= median(alone) + slack[0],
    )
    lines = [
        f"Two API keys on {settings.workers} workers. The first {setup}",
        "",
        *_runs_table(alone, during),
    ]
    return Section(name[0], name[1], lines, {"alone_s": alone, "during_s": during} | data, [target])


async def _prompt_runs(
    settings: BenchSettings,
    name: str,
    *,
    delay: float = 0.0,
    unavailable: int = 0,
    size: tuple[int, int] = SIZE,
    count: int | None = None,
) -> tuple[list[float], list[float]]:
    """Each run's prompt request alone and beside the other owner's (`_beside`)."""
    alone, during = [], []
    for i in range(settings.runs):
        a, d = await _beside(
            settings,
            f"{name}r{i}",
            delay=delay,
            unavailable=unavailable,
            size=size,
            count=count or settings.slow_images,
        )
        alone.append(a)
        during.append(d)
        log(f"{name} run {i + 1}/{settings.runs}: prompt request {d:.2f} s (alone {a:.2f} s)")
    return alone, during


def _runs_table(alone: list[float], during: list[float]) -> list[str]:
    return table(
        ("run", "prompt request alone, s", "beside the other owner's, s"),
        [
            (i + 1, f"{a:.2f}", f"{d:.2f}")
            for i, (a, d) in enumerate(zip(alone, during, strict=True))
        ],
    )


async def _beside(
    settings: BenchSettings,
    tag: str,
    *,
    delay: float = 0.0,
    unavailable: int = 0,
    size: tuple[int, int] = SIZE,
    count: int = 0,
) -> tuple[float, float]:
    """(the prompt request's seconds alone, and beside the other owner's request of `count`
    images of `size`, whose origin answers after `delay`, and each image's first request 503
    with `Retry-After: unavailable` when set), on one stack."""
    slow_key, prompt_key = new_key(), new_key()
    keys = f"slowco:{key_hash(slow_key)}, quickco:{key_hash(prompt_key)}"
    async with (
        serve_images(size, delay=delay) as slow,
        serve_images(SIZE) as prompt,
    ):
        env = _stack_env(
            settings,
            slow,
            IMGPIPE_API_KEYS=keys,
            IMGPIPE_FETCH_ALLOW=f"127.0.0.1:{slow.port},127.0.0.1:{prompt.port}",
        )
        with running_stack(env) as stack:
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                n = settings.prompt_images
                alone = await _until_done(http, stack, _urls(prompt, n, f"{tag}a"), prompt_key)
                slow_urls = _urls(slow, count or settings.slow_images, f"{tag}s")
                if unavailable:
                    slow.unavailable.update(
                        (url.removeprefix(slow.url("")), [unavailable]) for url in slow_urls
                    )
                await upload(http, stack, csv_bytes(slow_urls, 10, f"{tag}s"), api_key=slow_key)
                await asyncio.sleep(SLOW_HEAD_START)  # the slow owner's tasks fill the workers
                during = await _until_done(http, stack, _urls(prompt, n, f"{tag}d"), prompt_key)
    return alone, during


async def _until_done(
    http: aiohttp.ClientSession, stack: Stack, urls: list[str], key: str
) -> float:
    """Seconds from the POST until the client sees the request Completed."""
    started = time.perf_counter()
    accepted = await upload(http, stack, csv_bytes(urls, 10, "p"), api_key=key)
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{stack.base_url}/status/{accepted.request_id}?page_size=1"
    deadline = started + 300
    while time.perf_counter() < deadline:
        async with http.get(url, headers=headers) as response:
            status: dict[str, Any] = await response.json()
        if status["status"] == "Completed":
            return time.perf_counter() - started
        if status["status"] == "Failed":
            raise RuntimeError(f"B13 request ended Failed: {status['progress']}")
        await asyncio.sleep(0.05)  # the client's polling interval
    raise RuntimeError("B13 request not Completed within 300 s")


BUSY_DROP = 0.05  # B17: giving slots back costs the busy origin's request at most this share
WAIT_IN_SLOT = "3600"  # B17's baseline: IMGPIPE_FETCH_CONNECTION_WAIT of an hour, never reached
GIVE_BACK, IN_SLOT = "give back", "wait in slot"


async def run_b17(settings: BenchSettings) -> Section:
    n, delay = settings.busy_images, settings.busy_delay
    rates: dict[str, list[float]] = {GIVE_BACK: [], IN_SLOT: []}
    give_backs: list[float] = []
    for i in range(settings.runs):
        for mode, extra in (
            (GIVE_BACK, {}),
            (IN_SLOT, {"IMGPIPE_FETCH_CONNECTION_WAIT": WAIT_IN_SLOT}),
        ):
            rate, busy = await _busy_origin_alone(settings, f"b{i}", extra)
            rates[mode].append(rate)
            if mode == GIVE_BACK:
                give_backs.append(busy / n)
            log(f"B17 run {i + 1}/{settings.runs}, {mode}: {rate:.2f} images/s, {busy:.0f} back")
    ratios = [g / w for g, w in zip(rates[GIVE_BACK], rates[IN_SLOT], strict=True)]
    ideal = settings.workers * 16 / delay  # every connection busy all the time
    target = Target(
        "B17",
        f"{n} images of a busy origin alone, giving slots back ÷ waiting in them (median of"
        f" {len(ratios)})",
        f"{median(ratios):.3f} ({median(rates[GIVE_BACK]):.2f} vs"
        f" {median(rates[IN_SLOT]):.2f} images/s; {median(give_backs):.2f} give-backs an image)",
        f"≥ {1 - BUSY_DROP:.2f}",
        median(ratios) >= 1 - BUSY_DROP,
    )
    lines = [
        f"One owner on {settings.workers} workers ({worker_concurrency({})} slots and 16"
        f" connections to an origin each) sends {n} images from an origin that answers each"
        f" after {delay:g} s, after"
        " one image per slot to warm the stack up. Images/s are the server's (images over"
        " completed_at - created_at); with every connection busy all the time they would be"
        f" {ideal:.1f}, but a worker's connections serve its images in rounds of {delay:g} s,"
        " and the images are not split evenly between the workers: with 336 images (10.5"
        " rounds a worker), a split within 8 of even costs each mode the same 11 rounds (with"
        " 320, 10 rounds, a worker given more than 160 took an 11th: 14.5 images/s instead of"
        " 15.9, in either mode). A new stack and origin for each figure, the two modes"
        " alternating. Give-backs are the workers'"
        ' `imgpipe_images_deferred_total{reason="busy"}` over the images.',
        "",
        *table(
            (
                "run",
                f"{GIVE_BACK}, images/s",
                f"{IN_SLOT}, images/s",
                "ratio",
                "give-backs an image",
            ),
            [
                (i + 1, f"{g:.2f}", f"{w:.2f}", f"{r:.3f}", f"{b:.2f}")
                for i, (g, w, r, b) in enumerate(
                    zip(rates[GIVE_BACK], rates[IN_SLOT], ratios, give_backs, strict=True)
                )
            ],
        ),
    ]
    data = {
        "give_back_ips": rates[GIVE_BACK],
        "wait_in_slot_ips": rates[IN_SLOT],
        "ratios": ratios,
        "give_backs_per_image": give_backs,
        "busy_images": n,
        "busy_delay_s": delay,
    }
    return Section("B17", "a busy origin", lines, data, [target])


async def _busy_origin_alone(
    settings: BenchSettings, tag: str, extra: dict[str, str]
) -> tuple[float, float]:
    """(the request's images/s, the times its tasks gave their slots back) on a new stack."""
    ports = metrics_ports(1, settings.workers)  # the offsets, from a base of 1
    base = free_port_block([port - 1 for port in ports.values()])
    workers = [port - 1 + base for name, port in ports.items() if name.startswith("worker-")]
    async with serve_images(SIZE, delay=settings.busy_delay) as origin:
        env = _stack_env(settings, origin, IMGPIPE_DEV_METRICS_BASE_PORT=str(base), **extra)
        with running_stack(env) as stack:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
                # One image per worker slot first: every worker reads the stream before the
                # figure's clock starts (a worker that starts late costs the run seconds).
                warm = settings.workers * 32
                await _finished(http, stack, _urls(origin, warm, f"{tag}w"), f"{tag}w", 300)
                before = await _busy_count(http, workers)
                urls = _urls(origin, settings.busy_images, tag)
                _, rate = await _finished(http, stack, urls, tag, 900)
                busy = await _busy_count(http, workers) - before
    return rate, busy


async def _busy_count(http: aiohttp.ClientSession, ports: list[int]) -> float:
    """The workers' imgpipe_images_deferred_total{reason="busy"}, summed."""
    total = 0.0
    for port in ports:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
            total += _sample(await response.text(), BUSY_SAMPLE)
    return total


BUSY_SAMPLE = 'imgpipe_images_deferred_total{reason="busy"}'


def _sample(exposition: str, name: str) -> float:
    """The value of the sample `name` (with its labels) in a Prometheus text exposition; 0 when
    it is absent."""
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
