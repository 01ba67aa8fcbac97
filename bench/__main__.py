"""make bench: pipeline throughput against a plain Pillow loop, side by side in one run.

B1 (codec efficiency): images/s of the whole pipeline (upload until Completed, through the
gateway, ingest, Redis Streams, workers, storage and Postgres) divided by images/s of a plain
Pillow loop (decode, JPEG quality 50) over the same images on the same cores. Both read the
same generated 1200×1200 photos; the loop runs in as many processes as the machine has cores.
Peak RSS of every service is read from /proc (VmHWM) after the run.

Results: bench/results/latest.md and latest.json. Knobs: IMGPIPE_BENCH_IMAGES (default 200),
IMGPIPE_BENCH_RUNS (default 3; the median is reported), IMGPIPE_BENCH_WORKERS (default 2).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from PIL import Image

from tests.origin import ImageOrigin, serve_images
from tests.stack import ROOT, Stack, start_stack

RESULTS = ROOT / "bench" / "results"
SIZE = (1200, 1200)
URLS_PER_ROW = 10


@dataclass
class Run:
    pillow_images_per_s: float
    pipeline_images_per_s: float

    @property
    def ratio(self) -> float:
        return self.pipeline_images_per_s / self.pillow_images_per_s


def _compress_plain(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=50)
        return out.tell()


def pillow_loop(images: list[bytes], processes: int) -> float:
    """images/s of the plain loop: decode + JPEG q50, in `processes` processes."""
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_compress_plain, images[:processes]))  # warm the workers up
        start = time.perf_counter()
        list(pool.map(_compress_plain, images, chunksize=4))
        return len(images) / (time.perf_counter() - start)


def csv_for(origin: ImageOrigin, count: int, tag: str) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    urls = [origin.url(f"/img/{i}.jpg") for i in range(count)]
    for row, start in enumerate(range(0, count, URLS_PER_ROW), start=1):
        writer.writerow([f"{tag}-{row}", f"Product {row}", ",".join(urls[start : start + 10])])
    return out.getvalue().encode()


async def pipeline_run(stack: Stack, origin: ImageOrigin, count: int, tag: str) -> float:
    """images/s from the POST /upload until the status says Completed."""
    body = csv_for(origin, count, tag)
    async with aiohttp.ClientSession() as http:
        start = time.perf_counter()
        async with http.post(
            f"{stack.base_url}/upload", data=body, headers={"Content-Type": "text/csv"}
        ) as response:
            if response.status != 202:
                raise RuntimeError(f"upload failed: {response.status} {await response.text()}")
            request_id = (await response.json())["request_id"]
        deadline = start + 600
        while time.perf_counter() < deadline:
            async with http.get(f"{stack.base_url}/status/{request_id}?page_size=1") as response:
                status = await response.json()
            if status["status"] in ("Completed", "Failed"):
                elapsed = time.perf_counter() - start
                if status["progress"]["images_done"] != count:
                    raise RuntimeError(f"pipeline lost images: {status['progress']}")
                return count / elapsed
            await asyncio.sleep(0.05)  # polling interval of the client, not synchronisation
    raise RuntimeError("pipeline did not finish within 600 s")


def peak_rss(stack: Stack) -> dict[str, int]:
    """VmHWM (peak resident set) in MiB of every service process under the launcher."""
    peaks: dict[str, int] = {}
    for pid in _descendants(stack.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if b"-m" not in cmdline:
            continue
        module = cmdline[cmdline.index(b"-m") + 1].decode()
        name = module.removeprefix("services.")
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                mib = int(line.split()[1]) // 1024
                key = name if name not in peaks else f"{name}-{pid}"
                peaks[key] = mib
    return peaks


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            frontier.append(child)
    return found


async def main() -> int:
    count = int(os.environ.get("IMGPIPE_BENCH_IMAGES", "200"))
    runs = int(os.environ.get("IMGPIPE_BENCH_RUNS", "3"))
    workers = int(os.environ.get("IMGPIPE_BENCH_WORKERS", "2"))
    cores = os.cpu_count() or 1
    results: list[Run] = []
    async with serve_images(SIZE) as origin:
        images = [origin.image(f"/img/{i}.jpg") for i in range(count)]
        with tempfile.TemporaryDirectory(prefix="imgpipe-bench-") as tmp:
            stack = start_stack(
                Path(tmp),
                {
                    "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port}",
                    "IMGPIPE_DEV_WORKERS": str(workers),
                    "IMGPIPE_LOG_LEVEL": "WARNING",
                },
            )
            try:
                for run in range(runs):
                    pillow = await asyncio.to_thread(pillow_loop, images, cores)
                    pipeline = await pipeline_run(stack, origin, count, f"r{run}")
                    results.append(Run(pillow, pipeline))
                    print(
                        f"run {run + 1}/{runs}: pillow {pillow:.1f}/s, pipeline {pipeline:.1f}/s,"
                        f" ratio {pipeline / pillow:.2f}",
                        file=sys.stderr,
                    )
                peaks = peak_rss(stack)
            finally:
                stack.stop()
    report = {
        "command": "make bench",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": cores,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "python": platform.python_version(),
        },
        "images": count,
        "image_size": f"{SIZE[0]}x{SIZE[1]}",
        "workers": workers,
        "runs": [asdict(r) | {"ratio": r.ratio} for r in results],
        "median": {
            "pillow_images_per_s": statistics.median(r.pillow_images_per_s for r in results),
            "pipeline_images_per_s": statistics.median(r.pipeline_images_per_s for r in results),
            "B1_ratio": statistics.median(r.ratio for r in results),
        },
        "peak_rss_mib": peaks,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict[str, object]) -> str:
    median = report["median"]
    machine = report["machine"]
    assert isinstance(median, dict) and isinstance(machine, dict)
    peaks = report["peak_rss_mib"]
    assert isinstance(peaks, dict)
    lines = [
        f"# imgpipe benchmark ({report['date']})",
        "",
        f"`{report['command']}` on {machine['cores']} cores, {machine['memory_gib']} GiB,"
        f" Python {machine['python']}; {report['images']} photos of {report['image_size']},"
        f" {report['workers']} workers; median of {len(report['runs'])} runs."  # type: ignore[arg-type]
        "",
        "",
        "| benchmark | value |",
        "|---|---|",
        f"| plain Pillow loop (decode + JPEG q50, {machine['cores']} processes) |"
        f" {median['pillow_images_per_s']:.1f} images/s |",
        f"| pipeline, upload → Completed | {median['pipeline_images_per_s']:.1f} images/s |",
        f"| **B1 = pipeline / Pillow loop** | **{median['B1_ratio']:.2f}** |",
        "",
        "Peak RSS (VmHWM) per service, MiB: "
        + ", ".join(f"{name} {mib}" for name, mib in sorted(peaks.items())),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
