"""Encoder settings per output format and effort level, chosen by measurement.

`effort` trades CPU for bytes, not quality. JPEG's Huffman optimisation and progressive scans
are lossless re-codings of the same coefficients, and PNG is lossless: their candidates decode
to the same pixels. WebP's `method` searches harder for the same quality setting (its pixels
differ slightly). Candidates that change what `quality` means (chroma subsampling,
quantisation tables) are not effort levels.

The table below is what `python -m bench B10` measured on the real-photo corpus (nine
photographs bundled with scikit-image, 1200 px on the long side, q90 sources; quality 50, one
thread; docs/performance.md has the figures). The rules that pick each level:

- `fast`: the least CPU per image;
- `balanced` (the default): on the Pareto front of CPU and bytes (no candidate is both faster
  and smaller), the one that saves the most bytes per extra CPU second over `fast`;
- `max`: the smallest files.

B10 applies the same rules to its own measurement and reports any level that would change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from services.common.image_options import Effort

# Pillow save() arguments per (format, effort); formats are OutputFormat values.
ENCODER_SETTINGS: MappingProxyType[tuple[str, Effort], MappingProxyType[str, Any]] = (
    MappingProxyType(
        {
            # JPEG: baseline 2.8 ms / 82.7 KiB; optimize 4.9 ms / 78.2 KiB (the smallest);
            # progressive, with or without optimize, 12 ms / 78.5 KiB: dominated.
            ("jpeg", Effort.FAST): MappingProxyType({}),
            ("jpeg", Effort.BALANCED): MappingProxyType({"optimize": True}),
            ("jpeg", Effort.MAX): MappingProxyType({"optimize": True}),
            # WebP method: 0 is 18 ms / 63.5 KiB, 2 is 33 ms / 51.6 KiB, 6 is 116 ms /
            # 46.5 KiB; 5 is dominated, and 4 (the old setting) costs as much as 3.
            ("webp", Effort.FAST): MappingProxyType({"method": 0}),
            ("webp", Effort.BALANCED): MappingProxyType({"method": 2}),
            ("webp", Effort.MAX): MappingProxyType({"method": 6}),
            # PNG: zlib level 1 is 82 ms / 1669 KiB, 3 is 122 ms / 1614 KiB; optimize (level
            # 9 plus a filter search, the old setting) 1162 ms / 1460 KiB, the smallest.
            # AVIF speed (libavif 1.4 + libaom, one encoder thread; 9 photos): 9 is 46 ms /
            # 59.1 KiB (10 writes the same bytes), 8 is 168 ms / 55.7 KiB, 6 (libavif's
            # default) 473 ms / 50.2 KiB, 4 is 2958 ms / 47.4 KiB, the smallest.
            ("avif", Effort.FAST): MappingProxyType({"speed": 9, "max_threads": 1}),
            ("avif", Effort.BALANCED): MappingProxyType({"speed": 8, "max_threads": 1}),
            ("avif", Effort.MAX): MappingProxyType({"speed": 4, "max_threads": 1}),
            ("png", Effort.FAST): MappingProxyType({"compress_level": 1}),
            ("png", Effort.BALANCED): MappingProxyType({"compress_level": 3}),
            ("png", Effort.MAX): MappingProxyType({"optimize": True}),
        }
    )
)


def encoder_settings(output: str, effort: Effort) -> MappingProxyType[str, Any]:
    """The Pillow save() arguments for `output` (an OutputFormat value) at `effort`."""
    return ENCODER_SETTINGS[(output, effort)]


# --- the rules, as code: bench/encoders.py (B10) applies them to its measurement ------------


@dataclass(frozen=True, slots=True)
class Measured:
    """One candidate's measurement: Pillow save() arguments, CPU and bytes per image."""

    name: str
    settings: Mapping[str, Any]
    cpu_ms: float
    kib: float


def pareto(candidates: Sequence[Measured]) -> list[Measured]:
    """The candidates no other one beats on both CPU and bytes."""
    return [
        c
        for c in candidates
        if not any(
            o.cpu_ms <= c.cpu_ms and o.kib <= c.kib and (o.cpu_ms, o.kib) != (c.cpu_ms, c.kib)
            for o in candidates
        )
    ]


def levels(candidates: Sequence[Measured]) -> dict[Effort, Measured]:
    """fast: the least CPU; max: the smallest files; balanced: the Pareto candidate that saves
    the most bytes per extra CPU second over fast (fast itself when nothing else is on the
    front)."""
    fast = min(candidates, key=lambda c: (c.cpu_ms, c.kib))
    smallest = min(candidates, key=lambda c: (c.kib, c.cpu_ms))
    slower = [c for c in pareto(candidates) if c.cpu_ms > fast.cpu_ms]
    balanced = (
        max(slower, key=lambda c: (fast.kib - c.kib) / (c.cpu_ms - fast.cpu_ms)) if slower else fast
    )
    return {Effort.FAST: fast, Effort.BALANCED: balanced, Effort.MAX: smallest}
