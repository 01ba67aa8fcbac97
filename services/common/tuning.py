"""Encode one normalised image as its options ask, and measure what quality it kept.

Four ways to pick the encoding, each with a bounded number of encodes:

- the requested quality: one encode;
- `target_ratio`: the highest quality (from QUALITY_FLOOR to 95) whose file is at most that
  share of the source's bytes, at most MAX_ENCODES encodes; when even the floor misses, the
  smallest file, noted TARGET_NOT_MET;
- `min_ssim`: the lowest quality (QUALITY_FLOOR to 95) whose SSIM is at least that, at most
  MAX_ENCODES encodes; when even 95 misses, the best SSIM found, noted TARGET_NOT_MET;
- `auto` (`auto_avif`): JPEG at the requested quality sets the SSIM to match; WebP (and AVIF)
  search for the lowest quality that reaches it, at most MAX_ENCODES - 1 encodes each; the
  smallest file that reaches it wins (JPEG itself when none beats it).

Every output's SSIM against the image it encodes is measured (services/common/quality.py).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from services.common import quality
from services.common.encoders import Effort, OutputFormat, encoder_settings
from services.common.quality_search import (
    SIZE_SLOPE,
    SSIM_SLOPE,
    Searched,
    log_bytes,
    search,
    ssim_scale,
)

QUALITY_FLOOR = 30  # the lowest quality a size or SSIM goal may choose
MAX_QUALITY = 95
MAX_ENCODES = 4  # per image, for a size or SSIM goal; per extra format for auto
TARGET_NOT_MET = "TARGET_NOT_MET"

# The formats `auto` compares; the first one sets the SSIM the others must reach.
AUTO_CANDIDATES = {
    OutputFormat.AUTO: (OutputFormat.JPEG, OutputFormat.WEBP),
    OutputFormat.AUTO_AVIF: (OutputFormat.JPEG, OutputFormat.WEBP, OutputFormat.AVIF),
}


@dataclass(frozen=True, slots=True)
class Choice:
    data: bytes
    format: OutputFormat  # a concrete format, never AUTO
    quality: int  # the quality setting used; 0 for lossless PNG
    ssim: float  # against the normalised, resized source (1.0 for PNG)
    note: str = ""  # TARGET_NOT_MET when the size or SSIM goal could not be reached
    encodes: int = 1


def choose(
    img: Image.Image,
    *,
    output: OutputFormat,
    requested: int,
    effort: Effort,
    target_ratio: float = 0.0,
    min_ssim: float = 0.0,
    source_bytes: int = 0,
) -> Choice:
    """The encoding of `img` (normalised for `output`, or for WebP under auto) that the goal
    asks for, with its measured SSIM. `source_bytes` is the size `target_ratio` applies to."""
    trial = _Trial(img, effort)
    if output in AUTO_CANDIDATES:
        return trial.smallest_at_equal_ssim(AUTO_CANDIDATES[output], requested)
    if output is OutputFormat.PNG:
        return trial.choice(trial.attempt(output, 0))
    if not (target_ratio or min_ssim):
        return trial.choice(trial.attempt(output, requested))
    # The size goal keeps the highest quality small enough, else the smallest file; the SSIM
    # goal the lowest quality good enough, else the best SSIM.
    if target_ratio:
        measure, goal = _size, log_bytes(math.floor(target_ratio * source_bytes))
        highest, slope, best_miss = True, SIZE_SLOPE, lambda c: -len(c.data)
    else:
        measure, goal = _scaled_ssim, ssim_scale(min_ssim)
        highest, slope, best_miss = False, SSIM_SLOPE, lambda c: c.ssim
    found = search(
        lambda q: measure(trial.attempt(output, q)),
        goal,
        highest=highest,
        low=QUALITY_FLOOR,
        high=MAX_QUALITY,
        first=requested,
        slope=slope,
        budget=MAX_ENCODES,
    )
    return trial.pick(output, found, best_miss=best_miss)


def _size(choice: Choice) -> float:
    return log_bytes(len(choice.data))


def _scaled_ssim(choice: Choice) -> float:
    return ssim_scale(choice.ssim)


def encode(img: Image.Image, output: OutputFormat, quality: int, effort: Effort) -> bytes:
    """One encode with the effort level's settings (services/common/encoders.py)."""
    out = io.BytesIO()
    settings = encoder_settings(output.value, effort)
    if output is OutputFormat.PNG:
        img.save(out, "PNG", **settings)  # lossless: quality does not apply
    else:
        img.save(out, output.value.upper(), quality=quality, **settings)
    return out.getvalue()


def for_output(img: Image.Image, output: OutputFormat) -> Image.Image:
    """`img` in a mode the encoder of `output` takes: JPEG has no alpha (flattened on white),
    WebP and AVIF no grey with alpha (and WebP no grey)."""
    if output is OutputFormat.JPEG and img.mode in ("LA", "RGBA"):
        colour_mode = "L" if img.mode == "LA" else "RGB"
        white = 255 if colour_mode == "L" else (255, 255, 255)
        background = Image.new(colour_mode, img.size, white)
        background.paste(img.convert(colour_mode), mask=img.getchannel("A"))
        return background
    if output in (OutputFormat.WEBP, OutputFormat.AUTO, OutputFormat.AUTO_AVIF) and img.mode in (
        "L",
        "LA",
    ):
        return img.convert("RGB" if img.mode == "L" else "RGBA")
    if output is OutputFormat.AVIF and img.mode == "LA":
        return img.convert("RGBA")
    return img


def measure_ssim(reference: np.ndarray, data: bytes) -> float:
    """The SSIM of the encoded `data` against `reference` (quality.luminance of its source)."""
    height, width = reference.shape
    with Image.open(io.BytesIO(data)) as decoded:
        # A JPEG's Y channel is the ITU-R 601 luma convert("L") computes: decoding only it
        # skips the chroma and the colour conversion. Not at a reduced size: libjpeg's 1/2 and
        # 1/4 scaled IDCTs are not box means, and against a box-reduced reference they cost
        # up to 0.025 SSIM on a sharp photo (docs/quality.md). Other formats ignore draft().
        decoded.draft("L", None)
        measured = quality.luminance(decoded, (width, height))
        return quality.ssim(reference, measured, sampled=True)


class _Trial:
    """Encodes of one image, each measured once and remembered by (format, quality)."""

    def __init__(self, img: Image.Image, effort: Effort) -> None:
        self.img = img
        self.effort = effort
        self._reference: np.ndarray | None = None  # the source's luma, once a lossy output needs it
        self.tried: dict[tuple[OutputFormat, int], Choice] = {}
        self._pixels: dict[OutputFormat, Image.Image] = {}

    def attempt(self, output: OutputFormat, q: int) -> Choice:
        key = (output, q)
        if key not in self.tried:
            if output not in self._pixels:
                self._pixels[output] = for_output(self.img, output)
            data = encode(self._pixels[output], output, q, self.effort)
            lossless = output is OutputFormat.PNG
            measured = 1.0 if lossless else measure_ssim(self.reference(), data)
            self.tried[key] = Choice(data, output, q, measured)
        return self.tried[key]

    def reference(self) -> np.ndarray:
        if self._reference is None:
            self._reference = quality.luminance(self.img)
        return self._reference

    def choice(self, picked: Choice, note: str = "") -> Choice:
        encodes = len(self.tried)
        return Choice(picked.data, picked.format, picked.quality, picked.ssim, note, encodes)

    def pick(
        self, output: OutputFormat, found: Searched, *, best_miss: Callable[[Choice], Any]
    ) -> Choice:
        """The search's answer; when nothing met the goal, the probe with the most `best_miss`."""
        if found.best is not None:
            return self.choice(self.tried[(output, found.best)])
        probes = [self.tried[(output, q)] for q in found.probes]
        return self.choice(max(probes, key=best_miss), TARGET_NOT_MET)

    def smallest_at_equal_ssim(self, formats: tuple[OutputFormat, ...], requested: int) -> Choice:
        first, *others = formats
        baseline = self.attempt(first, requested)
        reaching = [baseline]
        for output in others:
            found = search(
                lambda q, output=output: _scaled_ssim(self.attempt(output, q)),  # type: ignore[misc]
                _scaled_ssim(baseline),
                highest=False,
                low=1,
                high=MAX_QUALITY,
                first=requested,
                slope=SSIM_SLOPE,
                budget=MAX_ENCODES - 1,
            )
            if found.best is not None:
                reaching.append(self.tried[(output, found.best)])
        return self.choice(min(reaching, key=lambda c: len(c.data)))
