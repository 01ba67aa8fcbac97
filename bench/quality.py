"""B11 measured quality: bytes and SSIM per mode, and what the search costs.

Every mode runs `compress` (decode, normalise, choose, encode, measure SSIM) on the same real
photographs (testing/photos.py, 1200 px on the long side, served as the q90 JPEGs a merchant
links to) in this one thread; CPU is this thread's CPU time per image, so other work on the
machine changes it little (AVIF runs its encoder on this thread: max_threads=1). The modes are
the issue's: quality 50, target_ratio=0.5, min_ssim=0.95, AVIF and auto, plus WebP and
auto_avif for reference. "single encode" is Pillow alone encoding the decoded photo at JPEG
quality 50: the cost of one encode without decoding, choosing or measuring.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from bench.report import Section, Target, table
from services.common.image_options import Effort, ImageOptions, OutputFormat
from services.worker import quality
from services.worker.encoders import encoder_settings
from services.worker.imaging import Compressed, compress
from services.worker.tuning import MAX_ENCODES, TARGET_NOT_MET, measure_ssim
from testing import photos

IMAGES = 18  # the nine photographs, each also flipped
MODES = {
    "quality 50 (JPEG)": ImageOptions(),
    "target_ratio=0.5": ImageOptions(target_ratio=0.5),
    "min_ssim=0.95": ImageOptions(min_ssim=0.95),
    "WebP q50": ImageOptions(format=OutputFormat.WEBP),
    "AVIF q50": ImageOptions(format=OutputFormat.AVIF),
    "auto (JPEG, WebP)": ImageOptions(format=OutputFormat.AUTO),
    "auto_avif": ImageOptions(format=OutputFormat.AUTO_AVIF),
}


@dataclass(frozen=True, slots=True)
class ModeResult:
    name: str
    kib: float  # mean output size
    ratio: float  # total output bytes / total source bytes
    ssim: float  # mean
    ssim_min: float
    encodes: float  # mean encodes per image
    quality: float  # mean quality setting chosen
    not_met: int
    formats: dict[str, int]
    cpu_ms: float  # per image
    unflagged_misses: int  # outputs that miss the goal without a TARGET_NOT_MET note

    @property
    def images_per_s(self) -> float:
        return 1000 / self.cpu_ms if self.cpu_ms else 0.0


def measure(name: str, options: ImageOptions, sources: Sequence[bytes]) -> ModeResult:
    results: list[Compressed] = []
    started = time.thread_time()
    for source in sources:
        results.append(compress(source, options))
    cpu_ms = 1000 * (time.thread_time() - started) / len(sources)
    # Every mode here runs at the default effort, which measures every output.
    ssims = [r.ssim for r in results if r.ssim is not None]
    misses = sum(
        1
        for r, source in zip(results, sources, strict=True)
        if r.note != TARGET_NOT_MET
        and (
            (options.target_ratio and len(r.data) > math.floor(options.target_ratio * len(source)))
            or (options.min_ssim and (r.ssim or 0.0) < options.min_ssim)
        )
    )
    formats: dict[str, int] = {}
    for r in results:
        formats[r.format.value] = formats.get(r.format.value, 0) + 1
    return ModeResult(
        name,
        statistics.fmean(len(r.data) for r in results) / 1024,
        sum(len(r.data) for r in results) / sum(len(s) for s in sources),
        statistics.fmean(ssims),
        min(ssims),
        statistics.fmean(r.encodes for r in results),
        statistics.fmean(r.quality for r in results),
        sum(1 for r in results if r.note == TARGET_NOT_MET),
        formats,
        cpu_ms,
        misses,
    )


def single_encode_ms(images: Sequence[Image.Image]) -> float:
    settings = encoder_settings("jpeg", Effort.BALANCED)
    started = time.thread_time()
    for img in images:
        img.save(io.BytesIO(), "JPEG", quality=50, **settings)
    return 1000 * (time.thread_time() - started) / len(images)


def ssim_ms(images: Sequence[Image.Image]) -> float:
    """What measuring one output costs: the source's luma, decoding the output, its luma and
    the SSIM of the pair (services/worker/tuning.py does exactly this per encode)."""
    outputs = [photos.jpeg(img, 50) for img in images]
    started = time.thread_time()
    for img, data in zip(images, outputs, strict=True):
        measure_ssim(quality.luminance(img), data)
    return 1000 * (time.thread_time() - started) / len(images)


def run() -> Section:
    images = [photos.variant(i) for i in range(IMAGES)]
    sources = [photos.jpeg(img) for img in images]
    source_kib = statistics.fmean(len(s) for s in sources) / 1024
    results = [measure(name, options, sources) for name, options in MODES.items()]
    encode_ms = single_encode_ms(images)
    measure_ms = ssim_ms(images)
    plain = results[0]
    lines = [
        f"{IMAGES} real photographs (testing/photos.py), 1200 px on the long side, q90 JPEG"
        f" sources of {source_kib:.1f} KiB on average; `compress` in one thread, CPU time per"
        " image (decode, choose, encode, SSIM). SSIM: luminance, <= 512 px (docs/quality.md)."
        f" At most {MAX_ENCODES} encodes per image for target_ratio and min_ssim; auto spends"
        f" 1 + {MAX_ENCODES - 1} per extra format.",
        "",
        *table(
            (
                "mode",
                "avg KiB",
                "bytes vs source",
                "mean SSIM",
                "min SSIM",
                "encodes/image",
                "mean quality",
                "not met",
                "formats chosen",
                "CPU ms/image",
                "images/s/core",
                "CPU vs quality 50",
            ),
            [
                (
                    r.name,
                    f"{r.kib:.1f}",
                    f"{100 * r.ratio:.1f} %",
                    f"{r.ssim:.4f}",
                    f"{r.ssim_min:.4f}",
                    f"{r.encodes:.2f}",
                    f"{r.quality:.1f}",
                    str(r.not_met),
                    ", ".join(f"{k} {v}" for k, v in sorted(r.formats.items())),
                    f"{r.cpu_ms:.1f}",
                    f"{r.images_per_s:.1f}",
                    f"{r.cpu_ms / plain.cpu_ms:.2f}x",
                )
                for r in results
            ],
        ),
        "",
        f"A single JPEG q50 encode of the decoded photo (Pillow alone, balanced settings):"
        f" {encode_ms:.1f} ms CPU ({1000 / encode_ms:.0f} images/s/core). Measuring one"
        f" output's SSIM (source luma, decode, output luma, SSIM): {measure_ms:.1f} ms CPU.",
        "",
    ]
    data = {
        "images": IMAGES,
        "source_kib": round(source_kib, 1),
        "single_encode_ms": round(encode_ms, 2),
        "ssim_ms": round(measure_ms, 2),
        "modes": [
            {
                "mode": r.name,
                "kib": round(r.kib, 1),
                "ratio": round(r.ratio, 4),
                "mean_ssim": round(r.ssim, 4),
                "min_ssim": round(r.ssim_min, 4),
                "encodes": round(r.encodes, 2),
                "quality": round(r.quality, 1),
                "not_met": r.not_met,
                "formats": r.formats,
                "cpu_ms": round(r.cpu_ms, 1),
            }
            for r in results
        ],
    }
    targets = [
        Target(
            "B11",
            f"{r.name}: every output meets the goal or is noted TARGET_NOT_MET",
            f"{r.unflagged_misses} unflagged misses, {r.not_met} noted",
            "0 unflagged misses",
            r.unflagged_misses == 0,
        )
        for r, options in zip(results, MODES.values(), strict=True)
        if options.target_ratio or options.min_ssim
    ]
    return Section("B11", "measured quality: bytes and SSIM per mode", lines, data, targets)
