"""B12 no repeated work: a catalog where 30 % of the rows repeat a URL, images/s with and
without dedup, side by side; and the same catalog sent again by its owner.

Within a request. One stack, cross-request reuse off (so nothing but the URL dedup differs), the
two catalogs alternating in every run:
- without dedup: every row has a URL of its own; the repeated rows' URLs serve the same photo
  as the URL they stand for, so each is fetched and compressed, as before dedup;
- with dedup: the repeated rows name the URL itself, which is fetched and compressed once.
Across requests. A fresh stack per run with reuse on (the default): the catalog of distinct
photos, then the same catalog again: the second request fetches each photo (its bytes are the
key) and copies the stored output instead of compressing.
"""

from __future__ import annotations

import os
from functools import partial

import aiohttp

from bench.corpus import Corpus
from bench.cpu import CpuMeter
from bench.pipeline import log, process, running_stack
from bench.procs import measured
from bench.report import Section, Target, median, table
from bench.settings import BenchSettings
from testing.origin import ImageOrigin, serve_images

REPEATED_SHARE = 0.3
POPULAR = 10  # the URLs that the repeated rows name, like a brand's images in a catalog
WARMUP_IMAGES = 20
TIMEOUT = 900.0


def catalogs(origin: ImageOrigin, urls: list[str]) -> tuple[list[str], list[str]]:
    """(without, with): rows of which REPEATED_SHARE name one of the first POPULAR URLs again.
    In `without`, each such row has a URL of its own serving the same photo."""
    rows = len(urls)
    repeats = round(rows * REPEATED_SHARE)
    distinct = urls[: rows - repeats]
    with_dedup, without = list(distinct), list(distinct)
    for n in range(repeats):
        source = distinct[n % POPULAR]
        with_dedup.append(source)
        path = f"/img/repeat-{n}.jpg"
        origin.served[path] = origin.source(source)
        without.append(origin.url(path))
    # Repeats spread through the catalog, as in a real one (not all at its end).
    order = sorted(range(rows), key=lambda i: (i * 7919) % rows)
    return [without[i] for i in order], [with_dedup[i] for i in order]


async def run(settings: BenchSettings, corpus: Corpus) -> Section:
    rows = settings.dedup_rows
    rates: dict[str, list[float]] = {"without": [], "with": [], "first": [], "again": []}
    meters = {name: CpuMeter() for name in rates}
    async with serve_images(corpus.size) as origin:
        urls = corpus.serve(origin, rows)
        without, with_dedup = catalogs(origin, urls)
        env = {"IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}", "IMGPIPE_DEV_WORKERS": "2"}
        async with aiohttp.ClientSession() as http:
            with running_stack(env) as stack:
                group = partial(measured, stack)
                await process(http, stack, urls[:WARMUP_IMAGES], "warm", within=TIMEOUT)
                for i in range(settings.runs):
                    for name, catalog in (("without", without), ("with", with_dedup)):
                        with meters[name].measure(group):
                            _, seconds = await process(
                                http, stack, catalog, f"{name}{i}", within=TIMEOUT
                            )
                        rates[name].append(rows / seconds)
                    log(_progress("B12 in a request", i, settings.runs, rates, "without", "with"))
            for i in range(settings.runs):
                with running_stack(env | {"IMGPIPE_REUSE_OUTPUTS": "on"}) as stack:
                    group = partial(measured, stack)
                    # Other options than the measured requests': nothing of it is reused.
                    warm = {"quality": "49"}
                    await process(
                        http, stack, urls[:WARMUP_IMAGES], "warm", within=TIMEOUT, query=warm
                    )
                    for name in ("first", "again"):
                        with meters[name].measure(group):
                            _, seconds = await process(
                                http, stack, urls, f"{name}{i}", within=TIMEOUT
                            )
                        rates[name].append(rows / seconds)
                log(_progress("B12 across requests", i, settings.runs, rates, "first", "again"))
    return _section(rows, rates, meters)


def _progress(
    what: str, i: int, runs: int, rates: dict[str, list[float]], before: str, after: str
) -> str:
    return f"{what} run {i + 1}/{runs}: {rates[before][-1]:.1f} → {rates[after][-1]:.1f} images/s"


def _section(rows: int, rates: dict[str, list[float]], meters: dict[str, CpuMeter]) -> Section:
    med = {name: median(values) for name, values in rates.items()}
    runs = len(rates["without"])
    labels = {
        "without": "in a request, without dedup (every row its own URL)",
        "with": f"in a request, with dedup ({REPEATED_SHARE:.0%} of rows repeat a URL)",
        "first": "across requests: the owner's first request",
        "again": "across requests: the same catalog again (outputs copied)",
    }
    table_rows = [
        (
            labels[name],
            ", ".join(f"{r:.1f}" for r in rates[name]),
            f"{med[name]:.1f}",
            f"{1000 * meters[name].stack_seconds() / (rows * runs):.0f}",
            f"{meters[name].others_share:.0%}",
        )
        for name in rates
    ]
    in_request, across = med["with"] / med["without"], med["again"] / med["first"]
    ideal = 1 / (1 - REPEATED_SHARE)
    lines = [
        f"{rows} rows of one 1200×1200 photo each; {REPEATED_SHARE:.0%} of them name one of"
        f" {POPULAR} popular URLs again. Two workers on {os.cpu_count()} cores. In a request:"
        " one stack with cross-request reuse off, the two catalogs alternating in each run;"
        " without dedup, the repeated rows have URLs of their own serving the same photo (so"
        " each is fetched and compressed, as before dedup). Across requests: a fresh stack per"
        " run with reuse on, the catalog without repeats sent twice. Stack CPU counts every"
        " service, Postgres and Redis; others' share is the machine's CPU used meanwhile by"
        " processes outside imgpipe and the bench.",
        "",
        *table(
            ("catalog", "runs, images/s", "median images/s", "stack CPU ms/row", "others' share"),
            table_rows,
        ),
        "",
        f"With dedup a row costs {1 / in_request:.0%} of its cost without; if the repeated rows"
        f" cost nothing, it would be {1 / ideal:.0%} ({ideal:.2f}× the images/s).",
    ]
    return Section(
        "B12",
        "no repeated work",
        lines,
        {
            "rows": rows,
            "repeated_share": REPEATED_SHARE,
            "images_per_s": rates,
            "median": med,
            "speedup_in_request": in_request,
            "speedup_across_requests": across,
        },
        [
            Target(
                "B12",
                f"images/s with dedup ÷ without, {REPEATED_SHARE:.0%} repeated rows",
                f"{in_request:.2f}×",
                f"≈ {ideal:.2f}× (repeats cost nothing)",
                None,
            ),
            Target("B12", "images/s of a catalog sent again ÷ first", f"{across:.2f}×", "—", None),
        ],
    )
