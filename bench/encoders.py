"""B10 encoder settings: CPU and bytes of every candidate, and the effort levels they imply.

Each candidate encodes the same decoded real photographs (testing/photos.py, 1200 px on the
long side) at quality 50 in this one thread; CPU is this thread's CPU time, so other work on
the machine changes it little. The rules of services/worker/encoders.py then pick `fast`,
`balanced` and `max` from the measurement, and the report says whether the committed table
agrees.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from bench.report import Section, Target, table
from services.worker.encoders import ENCODER_SETTINGS, Measured, levels, pareto
from testing import photos

QUALITY = 50
CANDIDATES: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
    "jpeg": {
        "baseline": {},
        "optimize": {"optimize": True},
        "progressive": {"progressive": True},
        "progressive + optimize": {"progressive": True, "optimize": True},
    },
    "webp": {f"method {m}": {"method": m} for m in range(7)},
    # AVIF (libavif 1.4 with libaom through Pillow): speed 0-3 cost more than speed 4's 3 s per
    # photo; speed 10 writes the very bytes of speed 9 (libaom's fastest still-image setting),
    # so it is no candidate of its own. One encoder thread, as in the worker, whose thread pool
    # already spreads images over the cores (and whose CPU time per image this measures).
    "avif": {f"speed {s}": {"speed": s, "max_threads": 1} for s in range(4, 10)},
    "png": {
        **{f"compress_level {level}": {"compress_level": level} for level in (1, 3, 6, 9)},
        "optimize": {"optimize": True},
    },
}
# PNG of a photograph is slow and big: fewer images keep B10 within a minute.
IMAGES = {"jpeg": 18, "webp": 18, "avif": 9, "png": 4}
REPEATS = {"jpeg": 5, "webp": 2, "avif": 1, "png": 1}


def measure(output: str, images: Sequence[Image.Image]) -> list[Measured]:
    results = []
    for name, settings in CANDIDATES[output].items():
        extra = {} if output == "png" else {"quality": QUALITY}
        total, started = 0, time.thread_time()
        for _ in range(REPEATS[output]):
            for img in images:
                out = io.BytesIO()
                img.save(out, output.upper(), **extra, **settings)
                total += out.tell()
        count = REPEATS[output] * len(images)
        cpu_ms = 1000 * (time.thread_time() - started) / count
        results.append(Measured(name, settings, cpu_ms, total / count / 1024))
    return results


def run() -> Section:
    lines, targets = _intro(), []
    data: dict[str, object] = {}
    for output, count in IMAGES.items():
        images = [photos.variant(i) for i in range(count)]
        measured = measure(output, images)
        chosen = levels(measured)
        front = {c.name for c in pareto(measured)}
        data[output] = {
            "images": count,
            "candidates": [
                {"name": c.name, "cpu_ms": round(c.cpu_ms, 2), "kib": round(c.kib, 1)}
                for c in measured
            ],
            "chosen": {effort.value: c.name for effort, c in chosen.items()},
        }
        lines += [
            f"**{output.upper()}** ({count} photos, {REPEATS[output]} passes):",
            "",
            *table(
                ("candidate", "CPU ms/image", "average KiB", "Pareto front", "effort"),
                [
                    (
                        c.name,
                        f"{c.cpu_ms:.2f}",
                        f"{c.kib:.1f}",
                        "yes" if c.name in front else "",
                        ", ".join(e.value for e, m in chosen.items() if m is c),
                    )
                    for c in measured
                ],
            ),
            "",
        ]
        for effort, picked in chosen.items():
            committed = dict(ENCODER_SETTINGS[(output, effort)])
            targets.append(
                Target(
                    "B10",
                    f"{output} {effort.value}: committed setting is the measured choice",
                    picked.name,
                    _name(output, committed),
                    committed == dict(picked.settings),
                )
            )
    return Section("B10", "encoder settings", lines, data, targets)


def _name(output: str, settings: Mapping[str, Any]) -> str:
    for name, candidate in CANDIDATES[output].items():
        if dict(candidate) == dict(settings):
            return name
    return repr(dict(settings))


def _intro() -> list[str]:
    return [
        "Every candidate encodes the same decoded real photographs (scikit-image's nine, 1200 px"
        " on the long side, flipped and turned for variety) at quality 50 in one thread; CPU is"
        " the thread's CPU time per image. All candidates of one format decode to the same"
        " pixels. fast = least CPU; max = smallest; balanced = on the Pareto front, most bytes"
        " saved per extra CPU second over fast (services/worker/encoders.py).",
        "",
    ]
