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

The SSIM of every output against the image it encodes is measured
(services/worker/quality.py), except under `effort=fast` where the choice does not need it:
one measurement costs about two JPEG encodes (docs/quality.md), and fast is for throughput.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from services.common.image_options import Effort, OutputFormat
from services.worker import quality
from services.worker.encoders import encoder_settings
from services.worker.quality_search import (
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
    ssim: float | None  # against the normalised, resized source (1.0 for PNG); None: not measured
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
    asks for, with its measured SSIM. `source_bytes` is the size `target_ratio` applies to.

    `effort=fast` measures SSIM only where the choice depends on it (`min_ssim`, auto); its
    other outputs have `ssim` None: not measured. PNG is lossless, SSIM 1.0 unmeasured."""
    trial = _Trial(img, effort, measure=effort is not Effort.FAST)
    if output in AUTO_CANDIDATES:
        return trial.smallest_at_equal_ssim(AUTO_CANDIDATES[output], requested)
    if output is OutputFormat.PNG:
        return trial.choice(trial.attempt(output, 0))
    if not (target_ratio or min_ssim):
        return trial.choice(trial.attempt(output, requested))
    # The size goal keeps the highest quality small enough, else the smallest file; the SSIM
    # goal the lowest quality good enough, else the best SSIM. Only the SSIM goal measures
    # every probe; the size goal measures the one it keeps.
    if target_ratio:
        goal = log_bytes(math.floor(target_ratio * source_bytes))
        highest, slope = True, SIZE_SLOPE

        def measure(q: int) -> float:
            return log_bytes(len(trial.attempt(output, q).data))

        def best_miss(c: Choice) -> float:
            return -len(c.data)
    else:
        goal = ssim_scale(min_ssim)
        highest, slope = False, SSIM_SLOPE

        def measure(q: int) -> float:
            return trial.scaled_ssim(output, q)

        def best_miss(c: Choice) -> float:
            return trial.ssim(c.format, c.quality)

    found = search(
        measure,
        goal,
        highest=highest,
        low=QUALITY_FLOOR,
        high=MAX_QUALITY,
        first=requested,
        slope=slope,
        budget=MAX_ENCODES,
    )
    return trial.pick(output, found, best_miss=best_miss)


def encode(img: Image.Image, output: OutputFormat, quality: int, effort: Effort) -> bytes:
    """One encode with the effort level's settings (services/worker/encoders.py)."""
    settings = dict(encoder_settings(output.value, effort))
    if output is not OutputFormat.PNG:  # PNG is lossless: quality does not apply
        settings["quality"] = quality
    with _scratch_file() as out:
        img.save(out, output.value.upper(), **settings)
        out.seek(0)
        return out.read()


@contextlib.contextmanager
def _scratch_file() -> Iterator[BinaryIO]:
    """A file in memory to encode into, with a real file descriptor where the system has them.

    Pillow encodes into a file descriptor with the GIL released, but holds the GIL for the
    whole encode when the target is a Python object such as BytesIO (its encode.c:
    `_encode_to_file` against `_encode`). Into a BytesIO, a worker's codec threads would
    encode one at a time and its event loop would wait behind every encode. The bytes are
    the same either way (tests/unit/test_encoders.py).
    """
    try:
        fd = os.memfd_create("imgpipe-encode", os.MFD_CLOEXEC)
    except (AttributeError, OSError):  # not Linux, or refused (a sandbox, no descriptors left)
        yield io.BytesIO()  # the same bytes, under the GIL
        return
    with open(fd, "w+b", buffering=0) as out:
        yield out


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
    """Encodes of one image, each encoded once and measured at most once, remembered by
    (format, quality)."""

    def __init__(self, img: Image.Image, effort: Effort, *, measure: bool) -> None:
        self.img = img
        self.effort = effort
        self.measure = measure  # measure the SSIM of the chosen output
        self.tried: dict[tuple[OutputFormat, int], Choice] = {}
        self._pixels: dict[OutputFormat, Image.Image] = {}
        self._reference: np.ndarray | None = None  # the source's luma, once an SSIM needs it

    def attempt(self, output: OutputFormat, q: int) -> Choice:
        """The encoding at `q`; its `ssim` is None until `ssim` measures it (1.0 for PNG)."""
        key = (output, q)
        if key not in self.tried:
            if output not in self._pixels:
                self._pixels[output] = for_output(self.img, output)
            data = encode(self._pixels[output], output, q, self.effort)
            lossless = 1.0 if output is OutputFormat.PNG else None
            self.tried[key] = Choice(data, output, q, lossless)
        return self.tried[key]

    def ssim(self, output: OutputFormat, q: int) -> float:
        """The SSIM of the encoding at `q`, measured once."""
        tried = self.attempt(output, q)
        if tried.ssim is not None:
            return tried.ssim
        if self._reference is None:
            self._reference = quality.luminance(self.img)
        measured = measure_ssim(self._reference, tried.data)
        self.tried[(output, q)] = dataclasses.replace(tried, ssim=measured)
        return measured

    def scaled_ssim(self, output: OutputFormat, q: int) -> float:
        return ssim_scale(self.ssim(output, q))

    def choice(self, picked: Choice, note: str = "") -> Choice:
        key = (picked.format, picked.quality)
        ssim = self.ssim(*key) if self.measure else self.tried[key].ssim  # as measured so far
        encodes = len(self.tried)
        return Choice(picked.data, picked.format, picked.quality, ssim, note, encodes)

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
        target = self.scaled_ssim(first, requested)
        reaching = [self.attempt(first, requested)]
        for output in others:
            found = search(
                lambda q, output=output: self.scaled_ssim(output, q),  # type: ignore[misc]
                target,
                highest=False,
                low=1,
                high=MAX_QUALITY,
                first=requested,
                slope=SSIM_SLOPE,
                budget=MAX_ENCODES - 1,
            )
            if found.best is not None:
                reaching.append(self.attempt(output, found.best))
        return self.choice(min(reaching, key=lambda c: len(c.data)))
