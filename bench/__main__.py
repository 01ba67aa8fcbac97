"""make bench: the benchmark suite of issue 6 against the real stack, results in bench/results/.

    python -m bench            # B1 … B17 → bench/results/latest.md, latest.json, scaling.png
    python -m bench B1 B4      # a subset → bench/results/subset.md and subset.json

B1 codec efficiency, B2 latency hiding, B3 ingest, B4 status under load, B5 worker memory,
B6 scaling, B7 scale-out (two worker groups sharing Postgres, Redis and SeaweedFS), B8 head of
line and B9 two owners (fair scheduling), B10 encoder settings (CPU and bytes of every
candidate; in-process, no stack), B11 measured quality (bytes and SSIM per mode: quality 50,
target_ratio, min_ssim, AVIF, auto; and the search's CPU cost; in-process), B12 no repeated
work (a catalog where 30 % of the rows repeat a URL, with and without dedup; a catalog sent
again by its owner), B13 a slow owner (one owner's images from a slow origin, another's
prompt ones sent into them), B14 a waiting owner (as B13, from an origin that answers 503 with
Retry-After), B15 a slow webhook receiver (one owner's receivers hang, another's webhook is
timed), B16 a heavy owner (as B13, with 24-megapixel photos that queue for the compress
threads), B17 a busy origin (one owner's images from a slow origin alone, its tasks giving
their slots back while they wait for a connection, against waiting in them).
bench/settings.py lists the IMGPIPE_BENCH_* knobs and their defaults. Every benchmark serves
real photographs (testing/photos.py) from 127.0.0.1 and talks to 127.0.0.1 only. None of this
is a test: nothing asserts a timing; the report compares the figures with the issue's targets.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from bench import (
    codec,
    dedup,
    encoders,
    fairness,
    ingest,
    memory,
    quality,
    scaleout,
    scaling,
    status_load,
    webhooks,
)
from bench.corpus import Corpus
from bench.pipeline import log
from bench.procs import machine
from bench.report import Section, Target, write
from bench.settings import BENCHMARKS, BenchSettings, select
from testing.stack import ROOT

RESULTS = ROOT / "bench" / "results"
PHOTO = (1200, 1200)
BIG_PHOTO = (6000, 4000)  # 24 megapixels
FAILED = "failed"


async def main(argv: list[str]) -> int:
    try:
        settings = BenchSettings.from_env(os.environ)
        names = select(argv)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    header: dict[str, object] = {
        "command": " ".join(["python -m bench", *argv]) if argv else "make bench (python -m bench)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "benchmarks": " ".join(names),
        "machine": machine(),
        "runs": settings.runs,
        "settings_changed": settings.changed(),
    }
    started = time.perf_counter()
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="imgpipe-bench-photos-") as tmp:
        photos, big = Corpus(Path(tmp), PHOTO), Corpus(Path(tmp), BIG_PHOTO)
        suite: list[tuple[tuple[str, ...], Callable[[], Awaitable[list[Section]]]]] = [
            (("B1", "B2"), lambda: codec.run(settings, photos, names)),
            (("B3",), lambda: _one(ingest.run(settings))),
            (("B4",), lambda: _one(status_load.run(settings, photos))),
            (("B5",), lambda: _one(memory.run(settings, big))),
            (("B6",), lambda: _one(scaling.run(settings, photos, RESULTS / "scaling.png"))),
            (("B7",), lambda: _one(scaleout.run(settings))),
            (("B8",), lambda: _one(fairness.run_b8(settings))),
            (("B9",), lambda: _one(fairness.run_b9(settings))),
            (("B10",), lambda: _one(asyncio.to_thread(encoders.run))),
            (("B11",), lambda: _one(asyncio.to_thread(quality.run))),
            (("B12",), lambda: _one(dedup.run(settings, photos))),
            (("B13",), lambda: _one(fairness.run_b13(settings))),
            (("B14",), lambda: _one(fairness.run_b14(settings))),
            (("B15",), lambda: _one(webhooks.run(settings))),
            (("B16",), lambda: _one(fairness.run_b16(settings))),
            (("B17",), lambda: _one(fairness.run_b17(settings))),
        ]
        for covers, run in suite:
            chosen = [name for name in covers if name in names]
            if chosen:
                sections += await _guarded(chosen, run)
    header["duration_s"] = round(time.perf_counter() - started, 1)
    stem = "latest" if names == BENCHMARKS else "subset"
    print(write(RESULTS, stem, header, sections))
    log(f"wrote {RESULTS / stem}.md and .json in {header['duration_s']:.0f} s")
    return 1 if any(s.title == FAILED for s in sections) else 0


async def _one(section: Awaitable[Section]) -> list[Section]:
    return [await section]


async def _guarded(names: list[str], run: Callable[[], Awaitable[list[Section]]]) -> list[Section]:
    """The benchmark's sections; if it breaks (a service crashed, a request got stuck), a
    section saying so, so the other benchmarks still run and the report still gets written."""
    try:
        return await run()
    except (RuntimeError, AssertionError, OSError, aiohttp.ClientError, TimeoutError) as exc:
        log(f"{'/'.join(names)} failed:\n{traceback.format_exc()}")
        problem = f"{type(exc).__name__}: {str(exc).strip()[-1500:]}"
        return [
            Section(
                name,
                FAILED,
                ["```", problem, "```"],
                {"error": problem},
                [Target(name, "the benchmark ran", "failed", "—", False)],
            )
            for name in names
        ]


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
