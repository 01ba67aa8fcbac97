"""The photos every benchmark serves, and the plain Pillow loops they are measured by.

Photos are real photographs (testing/photos.py: scikit-image's bundled nine, cropped, turned and
tiled so that every seed differs), written as q90 JPEGs once per suite run, in one process per
core, into a temporary folder; the origin serves their bytes and the Pillow loops read the
very same files.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from bench.pipeline import log
from services.common.image_options import Effort, OutputFormat
from services.worker import imaging, quality, tuning
from testing import photos
from testing.origin import ImageOrigin

# A plain Pillow loop: what anyone would write first (decode, RGB, save at quality 50).
PLAIN: dict[str, Any] = {"quality": 50}


class Corpus:
    """Photos of one size, named /img/<seed>.jpg, generated on first use and kept on disk."""

    def __init__(self, folder: Path, size: tuple[int, int]) -> None:
        self.folder = folder / f"{size[0]}x{size[1]}"
        self.size = size
        self.paths: list[Path] = []
        self._bytes: list[bytes] = []  # read once, shared by every origin that serves them

    def ensure(self, count: int) -> list[Path]:
        """The first `count` photos, generating the missing ones across every core."""
        if count > len(self.paths):
            self.folder.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            make = partial(_generate, str(self.folder), self.size)
            with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
                new = list(pool.map(make, range(len(self.paths), count)))
            self.paths.extend(Path(p) for p in new)
            took = time.perf_counter() - started
            log(f"generated {len(new)} photos of {self.size[0]}x{self.size[1]} in {took:.0f} s")
        return self.paths[:count]

    def serve(self, origin: ImageOrigin, count: int) -> list[str]:
        """Put the first `count` photos on `origin`; returns their URLs."""
        paths = self.ensure(count)
        self._bytes.extend(path.read_bytes() for path in paths[len(self._bytes) :])
        urls = []
        for seed in range(count):
            origin.served[f"/img/{seed}.jpg"] = self._bytes[seed]
            urls.append(origin.url(f"/img/{seed}.jpg"))
        return urls


def _generate(folder: str, size: tuple[int, int], seed: int) -> str:
    path = Path(folder) / f"{seed}.jpg"
    path.write_bytes(photos.jpeg(photos.sized(seed, *size)))
    return str(path)


def plain(path: str) -> int:
    """What anyone would write first: decode, RGB, JPEG at quality 50; the output's bytes."""
    data = Path(path).read_bytes()  # from the page cache: microseconds against milliseconds
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", **PLAIN)
        return out.tell()


def same_work(effort: Effort, measure: bool, path: str, scale: float = 1.0) -> int:
    """The worker's codec work on a photo, without its services: decode (with `scale` < 1,
    shrink-on-load as the worker asks it, and the worker's resize for what the decoder's
    scales do not reach); RGB only where the photo is not (the worker never copies an RGB
    image); JPEG at quality 50 with `effort`'s settings through the worker's own
    `tuning.encode`; with `measure`, the output's SSIM against the source, as the worker
    measures it. The output's bytes."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        target = (max(1, math.floor(width * scale + 0.5)), max(1, math.floor(height * scale + 0.5)))
        shrunk = imaging.shrink_on_load(image, target) if scale < 1 else 1
        # Loaded first, as the worker does: Pillow's save() of an image not yet loaded from a
        # nameless file object takes the file for its own source and copies the image.
        image.load()
        decoded = imaging.without_padding(image, (width, height), shrunk, target)
        rgb = decoded if decoded.mode == "RGB" else decoded.convert("RGB")
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        encoded = tuning.encode(rgb, OutputFormat.JPEG, PLAIN["quality"], effort)
        if measure:
            tuning.measure_ssim(quality.luminance(rgb), encoded)
        return len(encoded)


@dataclass(frozen=True, slots=True)
class Task:
    """One photo through a loop: the output's size and what the work cost its process."""

    output_bytes: int
    cpu_s: float
    system_s: float  # the kernel's share of cpu_s
    page_faults: int  # minor faults: fresh pages the kernel had to map (and zero)


def _timed(work: Callable[[str], int], path: str) -> Task:
    """The CPU time and its kernel share from one accounting (getrusage: the process's exact
    run time, split between user and kernel by the kernel). With the total from process_time
    instead, the split could exceed it on a photo of a few ms (7.70 ms of system time against
    7.69 ms of CPU in a CI run)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    size = work(path)
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return Task(size, user + system, system, after.ru_minflt - before.ru_minflt)


@dataclass(frozen=True, slots=True)
class PillowRun:
    images_per_s: float
    cpu_s: float  # CPU time of the measured images in the loop's processes
    images: int
    output_bytes: int
    system_s: float
    page_faults: int

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_s / self.images

    @property
    def system_ms_per_image(self) -> float:
        return 1000 * self.system_s / self.images

    @property
    def faults_per_image(self) -> float:
        return self.page_faults / self.images


def _ready(barrier: Any, setup: Callable[[], object] | None) -> None:
    if setup is not None:
        setup()
    barrier.wait(timeout=120)  # every process started before the first photo is timed


def pillow_loop(
    paths: list[Path],
    processes: int,
    work: Callable[[str], int] = plain,
    *,
    setup: Callable[[], object] | None = None,
) -> PillowRun:
    """`work` over `paths` in `processes` fresh interpreters, each prepared by `setup`:
    throughput, CPU and page faults of the photos themselves (not the interpreters' start),
    output bytes.

    Fresh interpreters (spawn), as a script run on its own: a process forked from the bench
    inherits glibc's malloc thresholds, which the bench's own history has raised, and with
    them a heap that never shrinks. The plain loop's speed hangs on exactly that
    (docs/performance.md, "The plain loop's two speeds").
    """
    names = [str(p) for p in paths]
    fresh = multiprocessing.get_context("spawn")
    barrier = fresh.Barrier(processes)
    with ProcessPoolExecutor(
        processes, mp_context=fresh, initializer=_ready, initargs=(barrier, setup)
    ) as pool:
        one = partial(_timed, work)
        list(pool.map(one, names[:processes]))  # imports and the codec warmed in every process
        started = time.perf_counter()
        tasks = list(pool.map(one, names, chunksize=4))
        rate = len(names) / (time.perf_counter() - started)
    return PillowRun(
        rate,
        sum(t.cpu_s for t in tasks),
        len(names),
        sum(t.output_bytes for t in tasks),
        sum(t.system_s for t in tasks),
        sum(t.page_faults for t in tasks),
    )
