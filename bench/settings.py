"""The benchmark knobs, read from `IMGPIPE_BENCH_*` environment variables in one place.

Defaults are the figures the issue asks for; smaller values are for quick iterations, and every
value used is written into the report so a reduced run cannot pass for a full one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

BENCHMARKS = tuple(f"B{n}" for n in range(1, 18))


@dataclass(frozen=True, slots=True)
class BenchSettings:
    runs: int = 3  # IMGPIPE_BENCH_RUNS: each figure is the median of this many runs
    images: int = 1000  # IMGPIPE_BENCH_IMAGES: 1200×1200 photos per run of B1, B2 and B6
    workers: int = 2  # IMGPIPE_BENCH_WORKERS: worker processes in B1, B2 and B4
    origin_delay: float = 0.2  # IMGPIPE_BENCH_ORIGIN_DELAY: seconds per image in B2
    ingest_rows: tuple[int, ...] = (10_000, 50_000, 100_000)  # IMGPIPE_BENCH_INGEST_ROWS
    urls_per_row: int = 3  # IMGPIPE_BENCH_URLS_PER_ROW: B3 (100,000 rows, 300,000 URLs)
    status_rate: int = 500  # IMGPIPE_BENCH_STATUS_RATE: B4 requests per second
    status_seconds: float = 20.0  # IMGPIPE_BENCH_STATUS_SECONDS: B4 duration of one run
    status_products: int = 100  # IMGPIPE_BENCH_STATUS_PRODUCTS: products of the B4 request
    big_images: int = 20  # IMGPIPE_BENCH_BIG_IMAGES: 6000×4000 photos per run of B5
    scaling_workers: tuple[int, ...] = (1, 2, 4)  # IMGPIPE_BENCH_SCALING_WORKERS: B6
    scaleout_images: int = 400  # IMGPIPE_BENCH_SCALEOUT_IMAGES: 400×300 photos per run of B7
    scaleout_delay: float = 0.2  # IMGPIPE_BENCH_SCALEOUT_DELAY: seconds per image in B7
    scaleout_concurrency: int = 4  # IMGPIPE_BENCH_SCALEOUT_CONCURRENCY: tasks per B7 worker
    hol_big: int = 20_000  # IMGPIPE_BENCH_HOL_BIG: images of B8's big request
    hol_small: int = 10  # IMGPIPE_BENCH_HOL_SMALL: images of B8's small requests
    fair_images: int = 2_000  # IMGPIPE_BENCH_FAIR_IMAGES: images of each B9 request
    fair_head_start: float = 10.0  # IMGPIPE_BENCH_FAIR_HEAD_START: seconds between B9's uploads
    hol_delay: float = 0.05  # IMGPIPE_BENCH_HOL_DELAY: origin latency per image in B8
    # IMGPIPE_BENCH_FAIR_DELAY: origin latency per image in B9, so that the workers'
    # connections to the origin (2 × 16) cap the rate below what the first request would
    # finish in its head start (64 images/s: 640 of its 2,000).
    fair_delay: float = 0.5
    dedup_rows: int = 300  # IMGPIPE_BENCH_DEDUP_ROWS: rows of B12's catalog (30 % repeats)
    slow_images: int = 600  # IMGPIPE_BENCH_SLOW_IMAGES: B13's images from the slow origin
    slow_delay: float = 5.0  # IMGPIPE_BENCH_SLOW_DELAY: seconds per image of B13's slow origin
    prompt_images: int = 200  # IMGPIPE_BENCH_PROMPT_IMAGES: B13's other owner's images
    # IMGPIPE_BENCH_RETRY_AFTER: B14's origin answers each image's first request 503 with it
    retry_after: int = 20
    # IMGPIPE_BENCH_HUNG_WEBHOOKS: B15's one-image requests whose webhook receiver never answers
    hung_webhooks: int = 64
    heavy_images: int = 300  # IMGPIPE_BENCH_HEAVY_IMAGES: B16's 24-megapixel photos
    # IMGPIPE_BENCH_BUSY_IMAGES: B17's images from one slow origin: 10.5 rounds of each of two
    # workers' 16 connections, so that an uneven split between the workers adds no round
    busy_images: int = 336
    busy_delay: float = 2.0  # IMGPIPE_BENCH_BUSY_DELAY: seconds per image of B17's origin
    # IMGPIPE_BENCH_STACK_ENV: `NAME=value,...` settings of the stack for every benchmark that
    # starts one, where the benchmark does not set them itself (it sets what its design needs:
    # B7 its workers' concurrency, say). To measure a setting before changing its default:
    # IMGPIPE_BENCH_STACK_ENV=IMGPIPE_WORKER_CONCURRENCY=32,IMGPIPE_SCHEDULER_WINDOW=128.
    stack_env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> BenchSettings:
        """Raises ValueError listing every malformed variable."""
        problems: list[str] = []
        defaults = cls()

        def number(name: str, default: float, parse: type[int] | type[float]) -> float:
            raw = environ.get(f"IMGPIPE_BENCH_{name}", "").strip()
            if not raw:
                return default
            try:
                value = parse(raw)
            except ValueError:
                value = 0
            if value <= 0:
                problems.append(f"IMGPIPE_BENCH_{name}={raw!r}: expected a positive number")
                return default
            return value

        def integers(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
            raw = environ.get(f"IMGPIPE_BENCH_{name}", "").strip()
            if not raw:
                return default
            try:
                values = tuple(int(part) for part in raw.split(",") if part.strip())
            except ValueError:
                values = ()
            if not values or min(values) <= 0:
                problems.append(f"IMGPIPE_BENCH_{name}={raw!r}: expected positive integers, a,b,c")
                return default
            return values

        settings = cls(
            runs=int(number("RUNS", defaults.runs, int)),
            images=int(number("IMAGES", defaults.images, int)),
            workers=int(number("WORKERS", defaults.workers, int)),
            origin_delay=number("ORIGIN_DELAY", defaults.origin_delay, float),
            ingest_rows=integers("INGEST_ROWS", defaults.ingest_rows),
            urls_per_row=int(number("URLS_PER_ROW", defaults.urls_per_row, int)),
            status_rate=int(number("STATUS_RATE", defaults.status_rate, int)),
            status_seconds=number("STATUS_SECONDS", defaults.status_seconds, float),
            status_products=int(number("STATUS_PRODUCTS", defaults.status_products, int)),
            big_images=int(number("BIG_IMAGES", defaults.big_images, int)),
            scaling_workers=integers("SCALING_WORKERS", defaults.scaling_workers),
            scaleout_images=int(number("SCALEOUT_IMAGES", defaults.scaleout_images, int)),
            scaleout_delay=number("SCALEOUT_DELAY", defaults.scaleout_delay, float),
            scaleout_concurrency=int(
                number("SCALEOUT_CONCURRENCY", defaults.scaleout_concurrency, int)
            ),
            hol_big=int(number("HOL_BIG", defaults.hol_big, int)),
            hol_small=int(number("HOL_SMALL", defaults.hol_small, int)),
            fair_images=int(number("FAIR_IMAGES", defaults.fair_images, int)),
            fair_head_start=number("FAIR_HEAD_START", defaults.fair_head_start, float),
            hol_delay=number("HOL_DELAY", defaults.hol_delay, float),
            fair_delay=number("FAIR_DELAY", defaults.fair_delay, float),
            dedup_rows=int(number("DEDUP_ROWS", defaults.dedup_rows, int)),
            slow_images=int(number("SLOW_IMAGES", defaults.slow_images, int)),
            slow_delay=number("SLOW_DELAY", defaults.slow_delay, float),
            retry_after=int(number("RETRY_AFTER", defaults.retry_after, int)),
            hung_webhooks=int(number("HUNG_WEBHOOKS", defaults.hung_webhooks, int)),
            heavy_images=int(number("HEAVY_IMAGES", defaults.heavy_images, int)),
            busy_images=int(number("BUSY_IMAGES", defaults.busy_images, int)),
            busy_delay=number("BUSY_DELAY", defaults.busy_delay, float),
            prompt_images=int(number("PROMPT_IMAGES", defaults.prompt_images, int)),
            stack_env=stack_env(environ, problems),
        )
        if problems:
            raise ValueError("; ".join(problems))
        return settings

    def changed(self) -> dict[str, object]:
        """The knobs that differ from the defaults (a reduced run says so in its report)."""
        defaults = asdict(BenchSettings())
        return {name: value for name, value in asdict(self).items() if value != defaults[name]}


def stack_env(
    environ: Mapping[str, str], problems: list[str] | None = None
) -> tuple[tuple[str, str], ...]:
    """IMGPIPE_BENCH_STACK_ENV as (name, value) pairs; a malformed entry is left out and told
    to `problems`. Only the services' settings may be given, not the benchmarks' own."""
    raw = environ.get("IMGPIPE_BENCH_STACK_ENV", "").strip()
    pairs = []
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = entry.partition("=")
        if not sep or not name.startswith("IMGPIPE_") or name.startswith("IMGPIPE_BENCH_"):
            if problems is not None:
                problems.append(
                    f"IMGPIPE_BENCH_STACK_ENV entry {entry!r}: expected IMGPIPE_NAME=value"
                )
            continue
        pairs.append((name, value))
    return tuple(pairs)


def select(argv: list[str]) -> tuple[str, ...]:
    """The benchmarks named on the command line (all of them when none is), in suite order."""
    wanted = {arg.upper() for arg in argv}
    unknown = sorted(wanted - set(BENCHMARKS))
    if unknown:
        raise ValueError(
            f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}"
        )
    return tuple(name for name in BENCHMARKS if not wanted or name in wanted)
