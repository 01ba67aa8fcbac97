"""The photos every benchmark serves, and the plain Pillow loops they are measured by.

Photos are real photographs (testing/photos.py: scikit-image's bundled nine, cropped, turned and
tiled so that every seed differs), written as q90 JPEGs once per suite run, in one process per
core, into a temporary folder; the origin serves their bytes and the Pillow loops read the
very same files.
"""

from __future__ import annotations

import io
import os
import resource
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from bench.pipeline import log
from services.worker import quality
from services.worker.tuning import measure_ssim
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


def encode(settings: Mapping[str, Any], measure: bool, path: str) -> int:
    """Decode, RGB, JPEG with `settings` (Pillow save() arguments); the output's bytes. With
    `measure`, also the output's SSIM against the source, as the worker measures it."""
    data = Path(path).read_bytes()  # from the page cache: microseconds against milliseconds
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        rgb = image.convert("RGB")
        rgb.save(out, "JPEG", **settings)
        if measure:
            measure_ssim(quality.luminance(rgb), out.getvalue())
        return out.tell()


@dataclass(frozen=True, slots=True)
class PillowRun:
    images_per_s: float
    cpu_s: float  # CPU time of the pool processes, warm-up and start-up included
    images: int  # warm-up included
    output_bytes: int  # of the measured images

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_s / self.images


def pillow_loop(
    paths: list[Path],
    processes: int,
    settings: Mapping[str, Any] = PLAIN,
    *,
    measure_ssim: bool = False,
) -> PillowRun:
    """The Pillow loop over `paths` in `processes` processes, saving with `settings` (and
    measuring each output's SSIM with `measure_ssim`): throughput, CPU cost and bytes.

    Must not overlap with other child processes ending: their CPU time would count too.
    """
    names = [str(p) for p in paths]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with ProcessPoolExecutor(processes) as pool:
        one = partial(encode, dict(settings), measure_ssim)
        list(pool.map(one, names[:processes]))  # start and warm the workers
        started = time.perf_counter()
        output = sum(pool.map(one, names, chunksize=4))
        rate = len(names) / (time.perf_counter() - started)
    # The pool's processes have ended and been reaped: their CPU time is now the children's.
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    return PillowRun(rate, cpu, len(names) + processes, output)
