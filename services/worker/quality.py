"""Measured quality: SSIM of an output against its source, cheap enough to run on every image.

SSIM (structural similarity, Wang et al. 2004) compares local means, contrasts and structure
of two images: 1.0 means identical pixels; around 0.95 a viewer at normal size is hard put to
tell the two apart; below about 0.90 the artefacts show. Here it is computed on luminance
only (ITU-R 601 luma, what the eye is most sensitive to) of a pair downscaled to at most
512 px on the long side, so one measurement costs a few milliseconds whatever the image size.

The formula is scikit-image's default `structural_similarity(..., data_range=255)`: a uniform
7x7 window, K1 = 0.01, K2 = 0.03, sample (co)variances (divided by 48), and the mean taken
over the pixels whose window lies inside the image. tests/unit/test_quality.py checks the two
agree. The window sums are exact integer sums of uint16 planes (x, y, x², y², xy) in one
scratch buffer per thread: fresh arrays of this size are often new pages from the kernel, and
faulting them in cost more than the arithmetic.

The worker measures with `sampled=True`: the windows at the top of non-overlapping 7-row
bands only, a seventh of them. Each band's rows then sum in one reduction, and the SSIM
formula runs on a seventh of the pixels; on the real-photo corpus the sampled mean stays
within 0.0007 of the full one (docs/quality.md).
"""

from __future__ import annotations

import math
import threading

import numpy as np
from PIL import Image

MAX_SIDE = 512  # the long side of the pair SSIM is computed on
WINDOW = 7  # scikit-image's default uniform window
_N = WINDOW * WINDOW
_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2
# With window sums S (not means) and sample covariances, SSIM's two factors scale by N**2 and
# N * (N - 1) after cancelling: these are C1 and C2 in those units.
_K1 = _C1 * _N * _N
_K2 = _C2 * _N * (_N - 1)
_SCRATCH_LIMIT = 5 * MAX_SIDE * MAX_SIDE  # uint16s kept per thread (2.5 MiB at most)
_scratch = threading.local()


def luminance(img: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """`img` as 8-bit luma, flattened on white where it has alpha, box-downscaled to `size`
    (default: at most MAX_SIDE on the long side, aspect kept). Encoders may change the colour
    of fully transparent pixels at will; on white they all look the same, as on a web page.

    The downscale first halves by whole factors (Image.reduce: exact 2x2 box means, cheap),
    then box-resamples the rest, as a JPEG decoded with draft() at 1/2, 1/4 or 1/8 does."""
    if img.mode in ("LA", "RGBA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    grey = img if img.mode == "L" else img.convert("L")
    size = size or reduced_size(grey.size)
    if grey.size != size:
        grey = grey.resize(size, Image.Resampling.BOX, reducing_gap=1.0)
    return np.asarray(grey)


def reduced_size(size: tuple[int, int]) -> tuple[int, int]:
    """`size` scaled to at most MAX_SIDE on the long side (never up)."""
    width, height = size
    factor = min(1.0, MAX_SIDE / max(width, height))
    return max(1, math.floor(width * factor + 0.5)), max(1, math.floor(height * factor + 0.5))


def ssim(reference: np.ndarray, other: np.ndarray, *, sampled: bool = False) -> float:
    """Mean SSIM of two same-shape 8-bit luma arrays (integers 0..255), in [-1, 1]; 1.0 when
    identical.

    With `sampled`, the mean is taken over the windows whose top row is a multiple of 7 only:
    non-overlapping bands of 7 rows, every column; a seventh of the windows for a fraction of
    the cost. On the real-photo corpus it is within SAMPLED_AGREEMENT of the full mean
    (docs/quality.md). Arrays smaller than the 7-pixel window on a side are compared as one
    window (their global means, variances and covariance)."""
    if reference.shape != other.shape or reference.ndim != 2:
        raise ValueError(f"SSIM needs arrays of one shape, not {reference.shape} and {other.shape}")
    height, width = reference.shape
    if min(height, width) < WINDOW:
        return _one_window(reference.astype(np.float64), other.astype(np.float64))
    rows = height - height % WINDOW if sampled else height
    planes = _planes(reference[:rows], other[:rows])
    total, count = 0.0, 0
    for offset in range(1 if sampled else WINDOW):
        bands = (rows - offset) // WINDOW
        if bands:
            sums = _window_sums(planes[:, offset : offset + bands * WINDOW], bands)
            total += _ssim_total(sums)
            count += sums.shape[1] * sums.shape[2]
    return total / count


# The largest difference between ssim(..., sampled=True) and the full mean measured on the
# corpus (tests/unit/test_quality.py checks it; docs/quality.md has the figures).
SAMPLED_AGREEMENT = 0.001


def _planes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x, y, x², y² and xy as 5 uint16 planes (255² fits), in this thread's scratch buffer."""
    height, width = x.shape
    planes = _buffer(5 * height * width).reshape(5, height, width)
    np.copyto(planes[0], x, casting="unsafe")
    np.copyto(planes[1], y, casting="unsafe")
    np.multiply(planes[0], planes[0], out=planes[2])
    np.multiply(planes[1], planes[1], out=planes[3])
    np.multiply(planes[0], planes[1], out=planes[4])
    return planes


def _window_sums(planes: np.ndarray, bands: int) -> np.ndarray:
    """The 7x7 window sums of the planes (`bands` * 7 rows), for the windows at the top of
    every band: (5, bands, width - 6), int32 (exact: 49 * 255² fits). A band's rows are summed
    in one reduction; its columns by doubling (1, 2, 4, then 4 + 4 minus the shared middle),
    a few whole-array additions instead of a running sum, which NumPy does element by element."""
    width = planes.shape[2]
    ones = planes.reshape(5, bands, WINDOW, width).sum(axis=2, dtype=np.int32)
    twos = ones[:, :, :-1] + ones[:, :, 1:]
    fours = twos[:, :, :-2] + twos[:, :, 2:]
    sevens: np.ndarray = fours[:, :, :-3] + fours[:, :, 3:]
    sevens -= ones[:, :, 3:-3]
    return sevens


def _ssim_total(sums: np.ndarray) -> float:
    """The sum of SSIM over windows, from their sums S(x), S(y), S(x²), S(y²), S(xy)."""
    sx, sy, sxx, syy, sxy = sums.astype(np.float64)
    # (2 S(x)S(y) + K1)(2 N S(xy) - 2 S(x)S(y) + K2) over (S(x)² + S(y)² + K1)(N S(x²+y²)
    # - S(x)² - S(y)² + K2): SSIM with sample (co)variances, times N² and N (N - 1) above
    # and below, which cancel. In place: these arrays are a few thousand windows at most.
    cross = sx * sy
    sx *= sx
    sy *= sy
    means = sx
    means += sy  # S(x)² + S(y)²
    sxy *= 2 * _N
    sxy -= cross
    sxy -= cross
    sxy += _K2
    sxx += syy
    sxx *= _N
    sxx -= means
    sxx += _K2
    cross *= 2
    cross += _K1
    cross *= sxy
    means += _K1
    means *= sxx
    cross /= means
    return float(cross.sum())


def _buffer(n: int) -> np.ndarray:
    """`n` uint16s of this thread's scratch buffer (a fresh array beyond _SCRATCH_LIMIT)."""
    if n > _SCRATCH_LIMIT:
        return np.empty(n, np.uint16)
    buffer: np.ndarray | None = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < n:
        buffer = _scratch.buffer = np.empty(n, np.uint16)
    return buffer[:n]


def _one_window(x: np.ndarray, y: np.ndarray) -> float:
    mx, my = x.mean(), y.mean()
    variances = x.var() + y.var()
    covariance = ((x - mx) * (y - my)).mean()
    numerator = (2 * mx * my + _C1) * (2 * covariance + _C2)
    return float(numerator / ((mx * mx + my * my + _C1) * (variances + _C2)))
